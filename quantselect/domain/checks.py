"""What `quantselect doctor` reports: one line per part of the set-up, its state and what to do."""

from __future__ import annotations

from dataclasses import asdict, dataclass

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"


@dataclass(frozen=True)
class Check:
    name: str  # the part checked: database, ray, gpus, ...
    status: str  # ok | info (nothing to judge) | warn (works, but see detail) | fail (a job would fail)
    detail: str  # one line: what was found, and what to do when it is not ok

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def failed(checks: list[Check]) -> bool:
    return any(c.status == FAIL for c in checks)
