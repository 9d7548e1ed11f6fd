"""Commander Ledger: an immutable, Datomic-style temporal ledger of commands and events."""

from ledger.errors import (
    ConfigMismatch,
    CorruptLedger,
    InvalidQuery,
    InvalidRecord,
    InvalidTime,
    LedgerError,
    LedgerLocked,
    ReadOnly,
)
from ledger.ledger import Ledger
from ledger.records import Datom, OffsetMark, Quarantined, Record, Transaction, TxReport, VerifyReport
from ledger.temporal import Database

__all__ = [
    "ConfigMismatch", "CorruptLedger", "Database", "Datom", "InvalidQuery", "InvalidRecord",
    "InvalidTime", "Ledger", "LedgerError", "LedgerLocked", "OffsetMark", "Quarantined", "ReadOnly", "Record",
    "Transaction", "TxReport", "VerifyReport",
]
