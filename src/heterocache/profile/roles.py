"""The four head roles of HeteroCache and their integer codes.

Codes are the ones of the published reference profiles (``meta.type_map``): anchor 1, volatile 2,
pivot 3, satellite 4. Code 0 and anything above 4 are invalid, so an all-zero tensor (a common
sign of a broken file) is rejected.
"""

from __future__ import annotations

from enum import IntEnum


class Role(IntEnum):
    """Role of one KV head.

    ===========  ==========================================  ==================
    role         found as                                    KV kept on GPU
    ===========  ==========================================  ==================
    ANCHOR       unique head, stable attention               compressed (fixed)
    VOLATILE     unique head, drifting attention             full
    PIVOT        centre of a cluster of similar heads        full
    SATELLITE    member of a pivot's cluster                 compressed (refreshed)
    ===========  ==========================================  ==================

    (HeteroCache's defaults; its ``turn_reselect="own"`` re-chooses anchors at a new turn, and
    ``pivot_offload`` compresses pivots too.)
    """

    ANCHOR = 1
    VOLATILE = 2
    PIVOT = 3
    SATELLITE = 4

    @property
    def label(self) -> str:
        """Lower-case name, as used in files and on the command line ("anchor", ...)."""
        return self.name.lower()

    @property
    def with_article(self) -> str:
        """"an anchor", "a volatile", ... for error messages."""
        return ("an " if self.label[0] in "aeiou" else "a ") + self.label

    @property
    def letter(self) -> str:
        """One-letter code for compact tables (A, V, P, S)."""
        return self.name[0]

    @property
    def compressed(self) -> bool:
        """True for the roles whose prompt KV is compressed (anchor, satellite)."""
        return self in (Role.ANCHOR, Role.SATELLITE)

    @classmethod
    def parse(cls, value: "Role | int | str") -> "Role":
        """Role from a Role, an integer code, or a name (any case; the reference code's older
        names Stable_Unique, Decaying_Unique, Similar_Leader, Similar_Member are accepted)."""
        if isinstance(value, Role):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            if key in _NAMES:
                return _NAMES[key]
            raise ValueError(f"unknown head role {value!r}; expected one of {sorted(_NAMES)}")
        try:
            return cls(int(value))
        except ValueError:
            raise ValueError(f"unknown head role code {value!r}; valid codes: {ROLE_CODES}") from None


# Older names used by the reference code (the published Qwen2.5-14B file still has them).
LEGACY_ROLE_NAMES = {
    "stable_unique": Role.ANCHOR,
    "decaying_unique": Role.VOLATILE,
    "similar_leader": Role.PIVOT,
    "similar_member": Role.SATELLITE,
}

_NAMES = {role.label: role for role in Role} | LEGACY_ROLE_NAMES

#: name -> code, written into every profile file so other tools can read the role tensor.
ROLE_CODES = {role.label: int(role) for role in Role}

COMPRESSED_ROLES = (Role.ANCHOR, Role.SATELLITE)
FULL_ROLES = (Role.VOLATILE, Role.PIVOT)
