"""Example command processors for the ledger; `examples.bank` is the demo bank."""
