"""The decoder ranks of ``roles.group_decode`` in the engine: one loop per decoder rank, the ranks decoding each
video together in rounds (:mod:`spmd_diff.parallel.decoder_group`), items arriving through each rank's own
channels as for any decoder (the engine runs this loop instead of ``loops.decoder_loop`` when the rank has a group).
"""

from __future__ import annotations

import time

from spmd_diff.comm.channel import ChannelReceiver, ReceiverPoller
from spmd_diff.comm.transport import Backoff
from spmd_diff.errors import StageTimeout
from spmd_diff.parallel.decoder_group import run_rounds
from spmd_diff.runtime.loops import Finisher, RankContext, warm_up


def decoder_group_loop(ctx: RankContext, from_dit: list[ChannelReceiver]) -> None:
    """A decoder rank of ``roles.group_decode``: the decoder ranks decode every item together, in rounds
    (:func:`spmd_diff.parallel.decoder_group.run_rounds`). Each round this rank checks its receivers without
    waiting and offers at most one item it received; an item that failed upstream (a failure record) goes
    straight to its ``loops.Finisher`` (the failure is written), as does each video of this rank's items once
    the group decoded it (written only). It ends when every member's producers have closed.

    Deadline: as ``loops.receive``'s, for the group: when no member offered anything for ``ctx.timeout_s`` (no
    item arrived at any of them), :class:`StageTimeout`; a member that stops taking part leaves the others in
    the round's collective, which raises at the collectives' own deadline. A decode that raises on a member
    aborts the job (the others are inside the collective), as a DiT group's decode does.
    """
    warm_up(ctx)
    finisher = Finisher(ctx)
    poller = ReceiverPoller(from_dit)
    state = {"idle_since": time.monotonic(), "backoff": _round_backoff()}

    def next_offer():
        while (chosen := poller.poll()) is not None:
            message = chosen.take(ctx.deadline())
            if chosen.closed:
                continue
            item = ctx.items[message.meta["item"]]
            if "failed" in message.meta:
                finisher.submit(item, message.meta, message.tensors)
                continue
            return (item.index, message.tensors["latents"]), False
        return None, poller.all_closed

    def on_round(result) -> None:
        now = time.monotonic()
        if result.num_offered:
            state["idle_since"], state["backoff"] = now, _round_backoff()
        elif now - state["idle_since"] > ctx.timeout_s:
            waiting = "; ".join(r.describe_wait() for r in from_dit if not r.closed) or "none (all closed)"
            raise StageTimeout(f"rank {ctx.rank}: the decoder group ({ctx.decoder_group.comm.size} ranks) "
                               f"had nothing to decode for {ctx.timeout_s:.0f} s; this rank waits on {waiting}")

    run_rounds(ctx.decoder_group, next_offer,
               lambda index, video: finisher.submit(ctx.items[index], {}, {"video": video}),
               lambda: state["backoff"].pause(), on_round)
    finisher.close()


def _round_backoff() -> Backoff:
    """Between rounds in which no decoder offered anything: every round is a collective, so no spinning."""
    return Backoff(num_spins=0, min_sleep_s=1e-4, max_sleep_s=2e-3)
