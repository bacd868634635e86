"""The ledger: where attribution happens.

``ledger`` is the entry point (:class:`Ledger`; its :class:`LedgerConfig` is defined
with the sidecar's other settings in ``enginetime.sidecar.config``); it joins
lockstep steps (``join``), predicts step costs (``costmodel``), divides each step's
device time among its entries (``attribution``), keeps requests in a bounded store of
slots and columns (``store``), tracks shards and engines (``shards``), storms
(``storms``) and per-request phases (``trace``), and answers with immutable snapshots
(``views``) or encoded responses (``accounting_wire``). Its consumers depend on the
small Protocols in ``protocols``, never on its private state.
"""

from enginetime.sidecar.ledger.ledger import Ledger, LedgerConfig, LedgerCounters

__all__ = ["Ledger", "LedgerConfig", "LedgerCounters"]
