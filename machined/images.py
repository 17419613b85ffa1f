"""The image pool: discovery of machine images and their attributes (issue: image pool).

Placeholder until the image pool lands: the pool reports no usage and no limit.
"""

from __future__ import annotations

UINT64_MAX = 2**64 - 1


def pool_usage(pool_path: str) -> int:
    return UINT64_MAX


def pool_limit(pool_path: str) -> int:
    return UINT64_MAX
