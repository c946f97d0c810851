"""JSON read as it streams in, re-written the way `json.dumps(value, ensure_ascii=False)` writes
it, piece by piece: what a streamed tool call's arguments are sent as, so the pieces a client
concatenates equal the arguments of the whole (non-streamed) answer.

`JsonStream.feed(text)` takes the next raw characters of one JSON value (any whitespace, any
escapes) and returns events: (`path`, `canonical`, `done`) where `path` is the chain of keys and
array indexes of the value the piece belongs to, `canonical` the piece of json.dumps' output it
makes (a string is written as its characters arrive; a number, `true`, `false` or `null` once it
has ended), and `done` marks the end of a value. The input must be (a prefix of) valid JSON:
text that is not raises ValueError.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

Path = tuple[str | int, ...]

_SCALAR_END = re.compile(r"[\s,\]}]")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


@dataclass
class _Frame:
    kind: str  # "{" or "["
    path: Path
    count: int = 0  # members written so far
    state: str = "start"  # start / key / colon / value / comma
    key: str = ""


@dataclass
class JsonStream:
    events: list[tuple[Path, str, bool]] = field(default_factory=list)
    _buf: str = ""
    _stack: list[_Frame] = field(default_factory=list)
    _string: tuple[Path, bool] | None = None
    """Inside a string: (its path, whether it is an object key)."""
    _key_chars: list[str] = field(default_factory=list)
    _ended: bool = False
    trailing: bool = False
    """Text after the value is left in `rest` (a marked tool call's closing tag), not an
    error."""

    def feed(self, text: str) -> list[tuple[Path, str, bool]]:
        """The events the next raw characters make (see the module docstring)."""
        self._buf += text
        self.events = []
        while self._step():
            pass
        return self.events

    @property
    def ended(self) -> bool:
        """The top-level value is complete."""
        return self._ended

    @property
    def rest(self) -> str:
        """With `trailing`, once the value ended: the text fed after it (less leading
        whitespace)."""
        return self._buf if self._ended else ""

    # -- the machine -------------------------------------------------------------------------
    def _emit(self, path: Path, text: str, done: bool = False) -> None:
        if text or done:
            self.events.append((path, text, done))

    def _step(self) -> bool:
        if self._string is not None:
            return self._string_step()
        buf = self._buf.lstrip()
        self._buf = buf
        if not buf:
            return False
        if self._ended:
            if self.trailing:
                return False
            raise ValueError(f"text after the JSON value: {buf[:20]!r}")
        c = buf[0]
        frame = self._stack[-1] if self._stack else None
        if frame is not None and frame.state == "colon":
            if c != ":":
                raise ValueError(f"expected ':' after key {frame.key!r}, got {c!r}")
            self._buf = buf[1:]
            frame.state = "value"
            return True
        if frame is not None and frame.state == "comma":
            if c == ",":
                self._buf = buf[1:]
                frame.state = "key" if frame.kind == "{" else "value"
                return True
            if c != ("}" if frame.kind == "{" else "]"):
                raise ValueError(f"expected ',' or the container's end, got {c!r}")
            return self._close(frame)
        if frame is not None and frame.state in ("start", "key") and frame.kind == "{":
            if c == "}" and frame.state == "start":
                return self._close(frame)
            if c != '"':
                raise ValueError(f"expected a key, got {c!r}")
            self._buf = buf[1:]
            self._string = (frame.path, True)
            self._key_chars = []
            return True
        if frame is not None and frame.state == "start" and c == "]":
            return self._close(frame)
        return self._value(buf, frame)

    def _value_path(self, frame: _Frame | None) -> Path:
        if frame is None:
            return ()
        return (*frame.path, frame.key if frame.kind == "{" else frame.count)

    def _separator(self, frame: _Frame | None) -> None:
        """The canonical text before a member (', ' after the first); in an object the key was
        written with its member's separator already."""
        if frame is not None and frame.kind == "[":
            self._emit(frame.path, ", " if frame.count else "")

    def _value(self, buf: str, frame: _Frame | None) -> bool:
        path = self._value_path(frame)
        c = buf[0]
        if c in "{[":
            self._separator(frame)
            self._buf = buf[1:]
            self._emit(path, c)
            self._stack.append(_Frame(kind=c, path=path))
            return True
        if c == '"':
            self._separator(frame)
            self._buf = buf[1:]
            self._emit(path, '"')
            self._string = (path, False)
            return True
        end = _SCALAR_END.search(buf)
        if end is None:  # a number or literal not ended yet (or the last thing in the text)
            if frame is None and buf in ("true", "false", "null"):
                return self._scalar(buf, len(buf), frame, path)
            return False
        return self._scalar(buf, end.start(), frame, path)

    def _scalar(self, buf: str, n: int, frame: _Frame | None, path: Path) -> bool:
        raw = buf[:n]
        try:
            value = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"not a JSON value: {raw!r}") from e
        if isinstance(value, (dict, list, str)):
            raise ValueError(f"not a JSON scalar: {raw!r}")
        self._separator(frame)
        self._buf = buf[n:]
        self._emit(path, json.dumps(value), True)
        self._member_done(frame)
        return True

    def finish(self) -> list[tuple[Path, str, bool]]:
        """The events of a number that ends the text (a top-level scalar has no terminator)."""
        self.events = []
        buf = self._buf.strip()
        if buf and not self._stack and self._string is None and not self._ended:
            self._scalar(buf, len(buf), None, ())
        return self.events

    def _member_done(self, frame: _Frame | None) -> None:
        if frame is None:
            self._ended = True
            return
        frame.count += 1
        frame.state = "comma"

    def _close(self, frame: _Frame) -> bool:
        self._buf = self._buf[1:]
        self._stack.pop()
        self._emit(frame.path, "}" if frame.kind == "{" else "]", True)
        self._member_done(self._stack[-1] if self._stack else None)
        return True

    def _string_step(self) -> bool:
        assert self._string is not None
        path, is_key = self._string
        buf, out, i = self._buf, [], 0
        while i < len(buf):
            c = buf[i]
            if c == '"':
                break
            if c == "\\":
                char, used = _escape(buf, i)
                if char is None:
                    break  # an escape cut short: wait for the rest
                out.append(char)
                i += used
                continue
            if ord(c) < 0x20:
                raise ValueError(f"a control character {c!r} inside a string")
            out.append(c)
            i += 1
        text = "".join(out)
        closed = i < len(buf) and buf[i] == '"'
        self._buf = buf[i + 1 :] if closed else buf[i:]
        if is_key:
            self._key_chars.append(text)
            if closed:
                frame = self._stack[-1]
                frame.key = "".join(self._key_chars)
                frame.state = "colon"
                self._emit(
                    frame.path,
                    (", " if frame.count else "")
                    + json.dumps(frame.key, ensure_ascii=False)
                    + ": ",
                )
                self._string = None
            return closed
        self._emit(path, json.dumps(text, ensure_ascii=False)[1:-1])
        if closed:
            self._emit(path, '"', True)
            self._string = None
            self._member_done(self._stack[-1] if self._stack else None)
        return closed


def _escape(buf: str, i: int) -> tuple[str | None, int]:
    """The character of the escape at buf[i] and its length; (None, 0) when cut short. A
    surrogate pair's two escapes make one character."""
    if i + 1 >= len(buf):
        return None, 0
    c = buf[i + 1]
    if c in _ESCAPES:
        return _ESCAPES[c], 2
    if c != "u":
        raise ValueError(f"invalid escape \\{c}")
    if i + 6 > len(buf):
        return None, 0
    code = int(buf[i + 2 : i + 6], 16)
    if 0xD800 <= code < 0xDC00:  # a high surrogate: the low one must follow
        if i + 12 > len(buf):
            return None, 0
        if buf[i + 6 : i + 8] == "\\u":
            low = int(buf[i + 8 : i + 12], 16)
            if 0xDC00 <= low < 0xE000:
                return chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)), 12
    return chr(code), 6
