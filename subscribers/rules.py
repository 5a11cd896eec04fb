"""The rules the subscriber database applies: vocabularies and the address policy.

They come from the settings (`mailer.config.Settings.rules()`), but `subscribers` cannot import
`mailer`, so they travel as this plain value.
"""

from __future__ import annotations

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

    def vocabulary(self, name: str) -> dict[str, str]:
        return {"region": self.regions, "organisation_type": self.organisation_types,
                "role": self.roles}[name]
