"""The rules the subscriber database applies: vocabularies and the address policy.

They come from the settings (`mailer.config.Settings.rules()`), but `subscribers` cannot import
`mailer`, so they travel as this plain value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DEFAULT_REGIONS: dict[str, str] = {
    "kent": "Kent",
    "essex": "Essex",
    "medway": "Medway",
    "southend": "Southend-on-Sea",
    "thurrock": "Thurrock",
    "national": "National",
    "other": "Other",
}

DEFAULT_ORGANISATION_TYPES: dict[str, str] = {
    "police": "Police",
    "local_authority": "Local authority",
    "ngo": "NGO or charity",
    "health": "Health",
    "border": "Border and immigration",
    "other": "Other",
}

DEFAULT_ROLES: dict[str, str] = {
    "first_responder": "First responder",
    "spoc": "Single point of contact (SPOC)",
    "safeguarding": "Safeguarding",
    "investigator": "Investigator",
    "analyst": "Analyst",
    "manager": "Manager",
    "support_worker": "Support worker",
    "other": "Other",
}


@dataclass(frozen=True)
class Rules:
    """What the store and importer accept. `suppression_key` keys the HMAC of addresses."""

    suppression_key: bytes
    regions: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_REGIONS))
    organisation_types: dict[str, str] = field(
        default_factory=lambda: dict(DEFAULT_ORGANISATION_TYPES)
    )
    roles: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ROLES))
    allow_smtputf8: bool = False
    check_deliverability: bool = False
    trusted_domains: tuple[str, ...] = ("police.uk", "gov.uk", "nhs.net", "nhs.uk")
    # slug_of(slug or label) -> slug, per vocabulary; built from the above, not compared.
    _lookups: dict[str, dict[str, str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Matching a typed value is per row of an import: build each lookup once.
        lookups = {
            name: {slug_of(text): slug for slug, label in vocab.items() for text in (slug, label)}
            for name, vocab in self._vocabularies().items()
        }
        object.__setattr__(self, "_lookups", lookups)

    def _vocabularies(self) -> dict[str, dict[str, str]]:
        return {"region": self.regions, "organisation_type": self.organisation_types,
                "role": self.roles}

    def vocabulary(self, name: str) -> dict[str, str]:
        return self._vocabularies()[name]

    def match(self, name: str, typed: str) -> str | None:
        """The slug in vocabulary `name` that `typed` names (by slug or label, any case)."""
        return self._lookups[name].get(slug_of(typed))


def slug_of(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.strip().lower()).strip("_")
