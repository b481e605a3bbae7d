"""Secure aggregation (SecAgg with dropout recovery, as in Bonawitz et al. 2017 and SecAgg+):
the fixed-point ring, the masks, the Shamir shares and the protocol records. See docs/security.md.

Flower ships a SecAgg+ workflow (``flwr.server.workflow.SecAggPlusWorkflow``), not reused here: its
masks come from numpy's ``RandomState`` (a Mersenne Twister, not a cryptographic generator), it
collects every masked vector before summing, and it runs its own round loop. Ours draws masks from
ChaCha20, folds each masked vector into a running sum as it arrives, and runs inside fedpeft's
round loop (retries, validation, checkpoints).
"""
