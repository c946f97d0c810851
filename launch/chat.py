"""Chat with a model in the terminal, streaming each reply as its tokens arrive.

    python launch/chat.py --tp 1                         # the demo model, in this process
    python launch/chat.py --model /models/internlm2_5-7b-chat --tp 4 --session-len 32768 \\
        --system "You are a terse assistant." --temperature 0.7 --top-p 0.9
    printf 'Hi!\\nWhat did I just say?\\n' | python launch/chat.py --tp 1   # scripted, via a pipe

Type a message and press Enter; the conversation so far goes through the model's chat template
each turn. Commands:
    /help        list the commands
    /reset       forget the conversation and the loaded document
    /doc FILE    load a UTF-8 text file to ask questions about; it starts a new conversation
                 (replacing an earlier document) and stays first in every prompt, so the
                 engine's prefix cache computes its tokens once for all the turns
    /exit        quit (so do Ctrl-D and /quit)
Ctrl-C while a reply streams stops it (its request is aborted) and drops that turn from the
history; Ctrl-C at the prompt quits with exit status 130. When a turn would pass --session-len
the oldest turns are dropped (never the document), with a one-line notice.

Replies (and /help) go to stdout; the `>>> ` prompt is shown only when stdin is a terminal.
Notices (a loaded document, dropped turns) and errors are one line each on stderr, so the
stdout of a piped session holds the replies alone, each ended by a newline. Every engine flag
of launch/run.py applies; without --model the demo model, SmolLM2-135M-Instruct, is fetched
once and cached (see launch/run.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_runtime import SamplingParams  # noqa: E402
from dist_runtime.engine.executor.base import WorkerError  # noqa: E402
from dist_runtime.engine.handle import RequestHandle  # noqa: E402
from dist_runtime.engine.outputs import RequestOutput  # noqa: E402
from dist_runtime.formats.demo_model import DemoModelError  # noqa: E402
from dist_runtime.jobs.doc_qa import qa_prompt  # noqa: E402
from dist_runtime.progress import plural  # noqa: E402
from dist_runtime.text.chat import encode_chat  # noqa: E402
from launch.run import (  # noqa: E402
    add_engine_args,
    add_sampling_args,
    bad_input,
    build_config,
    sampling_params,
    setup_logging,
    start_runtime,
    with_model,
)

if TYPE_CHECKING:  # (the Runtime, and torch with it, loads once the flags are checked)
    from dist_runtime import Runtime

logger = logging.getLogger("launch.chat")

PROMPT = ">>> "
HELP = """\
/help        list these commands
/reset       forget the conversation and the loaded document
/doc FILE    load a UTF-8 text file to ask about (starts a new conversation; it stays first
             in every prompt, so its tokens are computed once and reused from the cache)
/adapter [NAME]  answer with LoRA adapter NAME (one of --lora-modules); without NAME the
             base model; the conversation goes on
/exit        quit (also /quit, Ctrl-D)
Ctrl-C stops a streaming reply and drops that turn from the history; at the prompt it quits
(exit status 130). The oldest turns are dropped (never the document) when a turn would pass
the session length."""

DEFAULT_MAX_NEW_TOKENS = 512
INTERRUPTED = 130
"""Exit status after Ctrl-C at the prompt (128 + SIGINT), as launch/run.py's."""


def add_chat_args(p: argparse.ArgumentParser) -> None:
    """The chat's own flags beyond the engine's and the sampling ones (launch/run.py --chat can
    add them too): the system prompt."""
    p.add_argument(
        "--system",
        default=None,
        help="system prompt of the conversation (default: none, i.e. the chat template's)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_engine_args(p)
    add_sampling_args(p, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    add_chat_args(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


class ChatSession:
    """A conversation with one Runtime: its history, the loaded document and the last reply.

    The document goes into the first user turn ahead of the question (laid out as
    `dist_runtime.jobs.doc_qa.qa_prompt` lays out a document question), so every turn's prompt
    starts with the same tokens and the prefix cache serves the document's KV after the first.
    """

    def __init__(self, rt: Runtime, params: SamplingParams, system: str | None = None):
        if rt.tokenizer is None:
            raise ValueError(f"{rt.config.model} has no tokenizer; chat needs one")
        self.rt = rt
        self.tokenizer = rt.tokenizer
        self.params = params
        self.system = system or None
        self.history: list[tuple[str, str]] = []
        """(user message, reply) pairs, oldest first; the document is not in them."""
        self.document: str | None = None
        self.last_output: RequestOutput | None = None
        """The last reply that finished (num_cached_tokens: its prefix-cache hits)."""

    @classmethod
    def from_args(cls, rt: Runtime, args: argparse.Namespace) -> ChatSession:
        """A session with the sampling flags of `args` (launch/run.py's) and, when present,
        its --system."""
        return cls(rt, sampling_params(args), getattr(args, "system", None))

    @property
    def session_len(self) -> int:
        return self.rt.config.session_len

    def reset(self) -> None:
        self.history.clear()
        self.document = None

    def messages(
        self, question: str, history: list[tuple[str, str]] | None = None
    ) -> list[dict[str, str]]:
        """The chat messages of a turn asking `question` after `history` (default: all)."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        turns: list[tuple[str, str | None]] = [
            *(self.history if history is None else history),
            (question, None),
        ]
        for i, (user, reply) in enumerate(turns):
            if i == 0 and self.document is not None:
                user = qa_prompt(self.document, user)
            msgs.append({"role": "user", "content": user})
            if reply is not None:
                msgs.append({"role": "assistant", "content": reply})
        return msgs

    def prompt_ids(self, question: str) -> tuple[list[int], int]:
        """(token ids of the turn's prompt, oldest turns dropped to fit session_len). Raises
        ValueError when the question does not fit even after the document alone."""
        budget = self.session_len - self.params.max_new_tokens
        for dropped in range(len(self.history) + 1):
            ids = encode_chat(self.tokenizer, self.messages(question, self.history[dropped:]))
            if len(ids) <= budget:
                return ids, dropped
        what = "the document and this message take" if self.document else "this message takes"
        raise ValueError(
            f"{what} {len(ids)} prompt tokens + --max-new-tokens "
            f"{self.params.max_new_tokens} = {len(ids) + self.params.max_new_tokens}, over "
            f"--session-len {self.session_len}; shorten it, /reset, lower --max-new-tokens or "
            "raise --session-len"
        )

    def load_document(self, path: str) -> int:
        """Load a UTF-8 document and start a new conversation about it; its token count.
        Raises ValueError (unreadable, not UTF-8, empty, too long) and changes nothing then."""
        text = read_text(path)
        ids = encode_chat(
            self.tokenizer,
            [
                *([{"role": "system", "content": self.system}] if self.system else []),
                {"role": "user", "content": qa_prompt(text, "?")},
            ],
        )
        if len(ids) + self.params.max_new_tokens > self.session_len:
            raise ValueError(
                f"{path!r} makes a prompt of {len(ids)} tokens + --max-new-tokens "
                f"{self.params.max_new_tokens}, over --session-len {self.session_len}; raise "
                "--session-len (with --cp for long documents) or lower --max-new-tokens"
            )
        self.history.clear()
        self.document = text
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def reply(self, question: str) -> tuple[Generator[str, None, None], int]:
        """Start the reply to `question`: (its text pieces as they arrive, how many of the
        oldest turns were dropped to fit session_len). The turn joins the history once the
        reply is complete; closing the generator early (or Ctrl-C in it) aborts the request,
        frees its KV blocks and leaves the turn out. Raises ValueError, before anything
        changes, when the turn cannot fit."""
        ids, dropped = self.prompt_ids(question)
        (handle,) = self.rt.add_requests([ids], self.params)
        del self.history[:dropped]
        return self._stream(handle, question), dropped

    def _stream(self, handle: RequestHandle, question: str) -> Generator[str, None, None]:
        try:
            for delta in handle:
                if delta.text:
                    yield delta.text
            output = handle.result()
        finally:
            handle.abort()  # a no-op once done
        self.last_output = output
        self.history.append((question, output.text))


def chat_loop(
    session: ChatSession,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Read lines from stdin until /exit or EOF, answering each; the exit status."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    interactive = _isatty(stdin)
    use_input = interactive and stdin is sys.stdin and stdout is sys.stdout

    def note(line: str) -> None:
        stderr.write(line + "\n")
        stderr.flush()

    if interactive:
        if use_input:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
        stdout.write(f"chatting with {session.rt.config.model}; /help lists the commands\n")
    while True:
        try:
            if use_input:
                line = input(PROMPT)
            else:
                if interactive:
                    stdout.write(PROMPT)
                    stdout.flush()
                line = stdin.readline()
                if not line:
                    raise EOFError
        except EOFError:
            if interactive:
                stdout.write("\n")
            return 0
        except KeyboardInterrupt:
            stdout.write("\n")
            return INTERRUPTED
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                status = _command(session, line, stdout, note)
            else:
                status = _answer(session, line, stdout, note)
        except KeyboardInterrupt:  # Ctrl-C in a command or before a reply streams
            stdout.write("\n")
            note("interrupted")
            continue
        if status is not None:
            return status


def _command(
    session: ChatSession, line: str, stdout: TextIO, note: Callable[[str], None]
) -> int | None:
    """Run one /command; an exit status when the session ends."""
    name, _, rest = line.partition(" ")
    name = name.lower()
    if name in ("/exit", "/quit"):
        return 0
    if name == "/help":
        stdout.write(HELP + "\n")
        stdout.flush()
    elif name == "/reset":
        session.reset()
        note("conversation reset")
    elif name == "/adapter":
        wanted = rest.strip() or None
        loaded = session.rt.adapters
        if wanted is not None and wanted not in loaded:
            note(f"error: adapter {wanted!r} is not loaded (loaded: {loaded or 'none'})")
            return None
        session.params = dataclasses.replace(session.params, adapter=wanted)
        note(f"answering with adapter {wanted}" if wanted else "answering with the base model")
    elif name == "/doc":
        path = _unquote(rest.strip())
        if not path:
            note("error: /doc needs a file: /doc FILE")
            return None
        try:
            tokens = session.load_document(str(Path(path).expanduser()))
        except ValueError as e:
            note(f"error: {e}")
            return None
        note(f"loaded {path} ({plural(tokens, 'token')}); a new conversation about it starts")
    else:
        note(f"unknown command {name}; /help lists the commands")
    return None


def _answer(
    session: ChatSession, question: str, stdout: TextIO, note: Callable[[str], None]
) -> int | None:
    """Stream one reply to stdout; an exit status when the session cannot go on."""
    try:
        pieces, dropped = session.reply(question)
    except ValueError as e:  # too long for session_len or the KV cache
        note(f"error: {e}")
        return None
    except RuntimeError as e:  # the runtime is shut down
        note(f"error: {e}")
        return 1
    if dropped:
        kept = " (the document is kept)" if session.document else ""
        turns = "oldest turn" if dropped == 1 else f"{dropped} oldest turns"
        note(f"dropped the {turns} to stay within --session-len {session.session_len}{kept}")
    try:
        for piece in pieces:
            stdout.write(piece)
            stdout.flush()
    except KeyboardInterrupt:
        pieces.close()  # aborts the request (a no-op if the interrupt came from inside it)
        stdout.write("\n")
        stdout.flush()
        note("interrupted: the reply was stopped and this turn dropped from the history")
        return None
    except WorkerError as e:  # the runtime replaced its workers; this reply is gone
        stdout.write("\n")
        note(f"error: {e}")
        return None
    except RuntimeError as e:  # the engine died
        stdout.write("\n")
        note(f"error: {e}")
        return 1
    stdout.write("\n")
    stdout.flush()
    return None


def run_chat(
    rt: Runtime,
    args: argparse.Namespace,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Chat on a started Runtime with the flags of `args` (launch/run.py's sampling flags and,
    when present, --system); the exit status. launch/run.py --chat calls it with its own
    namespace. Raises ValueError on bad sampling values or a model without a tokenizer."""
    return chat_loop(ChatSession.from_args(rt, args), stdin, stdout, stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        sampling_params(args)  # bad sampling flags fail before the model loads
        config = with_model(build_config(args))
    except (ValueError, DemoModelError) as e:
        return bad_input(e, args)
    rt = start_runtime(config, args, service=False)
    if isinstance(rt, int):
        return rt
    with rt:
        try:
            return run_chat(rt, args)
        except ValueError as e:  # a model without a tokenizer
            print(f"error: {e}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # the reader of stdout went away
            _silence_stdout()
            return 1


def read_text(path: str) -> str:
    """A document's text: UTF-8, not blank; ValueError with a one-line reason otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from e
    if not text.strip():
        raise ValueError(f"{path!r} holds no text")
    return text


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _unquote(path: str) -> str:
    if len(path) >= 2 and path[0] == path[-1] and path[0] in "'\"":
        return path[1:-1]
    return path


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    raise SystemExit(main())
