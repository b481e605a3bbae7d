"""The client's side of secure aggregation (``docs/security.md``).

Four messages per attempt at a round, each answered from this node's ``Context.state``, where the
attempt's secrets live between messages (Flower keeps a node's state across messages, in
simulation and deployment):

1. ``query.secagg_keys``: fresh X25519 key pairs, one to receive shares, one to agree masks;
2. ``query.secagg_shares``: a fresh self-mask seed; Shamir shares of it and of the mask key, one
   bundle per participant, each encrypted for its holder;
3. ``train`` with a ``secagg`` record: the update, encoded in the ring and masked;
4. ``query.secagg_unmask``: for each survivor its share of the self-mask seed, for each dropout
   its share of the mask key, never both for one client; then the secrets are erased.
"""

from __future__ import annotations

import logging
import os

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedpeft.secagg import masks, shares
from fedpeft.secagg.messages import (
    MASKED,
    EncryptedShares,
    KeysRequest,
    MaskingRequest,
    PublicKeys,
    RevealedShares,
    SharesRequest,
    UnmaskRequest,
    encode_masked,
    pack_nodes,
    unpack_nodes,
)
from fedpeft.secagg.ring import FixedPoint
from fedpeft.secagg.summand import SummandLayout
from fedpeft.state import ClientPlan, ClientUpdate, GlobalState, update_weight
from fedpeft.wire import NUM_EXAMPLES, UPDATE_METRICS, WEIGHT

STATE = "secagg"
log = logging.getLogger(__name__)


class ProtocolError(ValueError):
    """A secure aggregation message this client must not answer (out of order, inconsistent)."""


def answer_keys(msg: Message, context: Context) -> Message:
    request = KeysRequest.from_content(msg.content)
    share_key, mask_key = masks.new_private_key(), masks.new_private_key()
    context.state[STATE] = ConfigRecord(
        {"session": request.session, "share-key": share_key, "mask-key": mask_key, "stage": "keys"}
    )
    keys = PublicKeys(request.session, masks.public_key(share_key), masks.public_key(mask_key))
    return Message(keys.to_content(), reply_to=msg)


def answer_shares(msg: Message, context: Context) -> Message:
    request = SharesRequest.from_content(msg.content)
    secrets = _secrets(context, request.session, "keys")
    me, nodes = context.node_id, request.nodes
    if me not in nodes or len(set(nodes)) != len(nodes) or not 2 <= request.threshold <= len(nodes):
        raise ProtocolError("the participant list or threshold is inconsistent")
    if len(request.share_keys) != len(nodes) or len(request.mask_keys) != len(nodes):
        raise ProtocolError("the participants' public keys do not match the participant list")
    self_seed = os.urandom(masks.SEED_BYTES)
    bundles = shares.share_secrets(self_seed, secrets["mask-key"], request.threshold, len(nodes))
    recipients, sealed = [], []
    for node, public, bundle in zip(nodes, request.share_keys, bundles, strict=True):
        if node == me:
            continue
        recipients.append(node)
        sealed.append(shares.encrypt(bundle, secrets["share-key"], public, request.session, me, node))
    secrets.update(
        {
            "stage": "shares",
            "self-seed": self_seed,
            "own-share": bundles[nodes.index(me)].to_bytes(),
            "nodes": pack_nodes(nodes),
            "share-keys": request.share_keys,
            "mask-keys": request.mask_keys,
            "threshold": request.threshold,
        }
    )
    return Message(EncryptedShares(request.session, recipients, sealed).to_content(), reply_to=msg)


def masked_reply(
    content: RecordDict, update: ClientUpdate, received: GlobalState, plan: ClientPlan, context: Context
) -> RecordDict:
    """The reply to a ``train`` message that carries a ``secagg`` record: ``update`` masked,
    weighted as ``plan.weighting`` says."""
    request = MaskingRequest.from_content(content)
    secrets = _secrets(context, request.session, "shares")
    me, participants = context.node_id, unpack_nodes(secrets["nodes"])
    if me not in request.nodes or not set(request.nodes) <= set(participants):
        raise ProtocolError("the masking set is not a subset of the participants")
    if len(request.nodes) < secrets["threshold"]:
        raise ProtocolError("fewer clients mask than the threshold that recovers them")
    weight = int(update_weight(update, plan.weighting))
    if max(weight, update.num_examples) > request.max_weight:
        raise ProtocolError(
            f"a weight of {max(weight, update.num_examples)} exceeds secure.max_examples = "
            f"{request.max_weight}, the largest weight the ring was sized for; raise it on the server"
        )
    if received.adapter is None:
        raise ProtocolError("secure aggregation needs the global adapter in the train message")
    layout = SummandLayout(received.adapter, received.extras, plan)
    codec = FixedPoint(request.clip_range, request.fraction_bits)
    summand = layout.encode(update, (received.adapter, received.extras), codec, request.clip_norm, weight)
    if summand.clipped:
        log.warning("secure aggregation clipped %d values to +-%g", summand.clipped, request.clip_range)
    keys = dict(zip(participants, secrets["mask-keys"], strict=True))
    peers = [(node, keys[node]) for node in request.nodes]
    masked = masks.mask(summand.vector, secrets["self-seed"], secrets["mask-key"], me, peers)
    secrets.update({"stage": "masked", "masked-with": pack_nodes(request.nodes)})
    counts = MetricRecord({NUM_EXAMPLES: update.num_examples, WEIGHT: weight})
    return RecordDict({MASKED: encode_masked(masked), UPDATE_METRICS: counts})


def answer_unmask(msg: Message, context: Context) -> Message:
    request = UnmaskRequest.from_content(msg.content)
    secrets = _secrets(context, request.session, "masked")
    me, survivors, dropouts = context.node_id, set(request.survivors), set(request.dropouts)
    if me not in survivors or survivors & dropouts:
        raise ProtocolError("a client cannot be both a survivor and a dropout")
    if survivors | dropouts != set(unpack_nodes(secrets["masked-with"])):
        raise ProtocolError("survivors and dropouts must be exactly the clients that masked")
    if len(survivors) < secrets["threshold"]:
        raise ProtocolError("too few survivors to reveal anything")
    participants = unpack_nodes(secrets["nodes"])
    share_keys = dict(zip(participants, secrets["share-keys"], strict=True))
    bundles = {me: shares.ShareBundle.from_bytes(secrets["own-share"])}
    for sender, sealed in zip(request.senders, request.shares, strict=True):
        if sender in survivors | dropouts and sender != me:
            key = share_keys[sender]
            bundles[sender] = shares.decrypt(sealed, secrets["share-key"], key, request.session, sender, me)
    owners = sorted(bundles)
    revealed = [bundles[o].self_seed if o in survivors else bundles[o].mask_key for o in owners]
    del context.state[STATE]  # single use: no second unmask request can be answered
    return Message(RevealedShares(request.session, owners, revealed).to_content(), reply_to=msg)


def _secrets(context: Context, session: bytes, stage: str) -> ConfigRecord:
    """This node's secrets for ``session``, which must have reached ``stage``."""
    secrets = context.state.get(STATE)
    if not isinstance(secrets, ConfigRecord) or secrets.get("session") != session:
        raise ProtocolError("no secure aggregation session of this id on this node")
    if secrets["stage"] != stage:
        raise ProtocolError(
            f"expected the message after stage {stage!r}, this node is at {secrets['stage']!r}"
        )
    return secrets
