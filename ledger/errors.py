"""The one error hierarchy: every failure the ledger reports is a LedgerError."""

from __future__ import annotations


class LedgerError(Exception):
    """Root of every error the ledger raises."""


class InvalidRecord(LedgerError):
    """A record handed to append() is malformed; names the record index and the field."""

    def __init__(self, index: int, field: str, reason: str) -> None:
        super().__init__(f"record {index}: field {field!r}: {reason}")
        self.index = index
        self.field = field
        self.reason = reason


class InvalidTime(LedgerError):
    """A time argument is neither a tx number nor a timezone-aware instant."""


class InvalidQuery(LedgerError):
    """SQL that DuckDB refused, or that the ledger does not allow."""


class LedgerLocked(LedgerError):
    """The ledger is already open for writing, by another process or earlier in this one."""


class ReadOnly(LedgerError):
    """A write was attempted on a ledger opened read-only."""


class ConfigMismatch(LedgerError):
    """Open was asked for settings that differ from those the ledger was created with."""


class CorruptLedger(LedgerError):
    """The data directory is not a ledger, or its catalog cannot be read."""


class UnknownView(LedgerError):
    """No view of that name (as of the tx asked about)."""


class InvalidViewName(LedgerError):
    """A view name that is malformed or would shadow a relation."""
