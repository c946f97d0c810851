"""What a Ray cluster still holds: for leak checks."""

from __future__ import annotations

from typing import Any


def ray_leftovers(ray: Any) -> tuple[int, int]:
    """(alive actors, placement groups not removed), read from the GCS (the state API would need
    a dashboard)."""
    from ray._private.state import actors as actor_table
    from ray.util import placement_group_table

    actors = [a for a in actor_table().values() if a["State"] == "ALIVE"]
    groups = [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
    return len(actors), len(groups)
