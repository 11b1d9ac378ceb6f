"""The exchange schedule of ``docs/design.md`` replayed on a clock per rank: one batch of S steps.

Owns ``simulate``: given a frozen ``dice_ds.schedule.Schedule`` (which (step, layer) is sync,
stale, skipping; the interweaved ring), per-layer compute seconds, message bytes, a link and
optionally each rank's expert load per (step, layer), it walks the program every rank runs, in
order, and returns the batch time. Every rank is at the same program point at once (all ranks run
the same program), so collectives are evaluated across ranks at that point.

What each call costs, as implemented (``dice_ds/moe/dispatcher.py``, ``runtime.py``):

- overlapped sync call (``Call.overlap``, ``_overlapped``): counts posted, the shared expert while
  they land, both halves' dispatches queued, then each half's experts while the other half's
  exchange moves; ends when both combines have arrived;
- sync call (sync EP, sync steps, sync layers): the outbox is flushed, then four serial pieces:
  counts (blocking: every rank's post + latency + ``hol_bytes`` at line rate), dispatch
  (blocking all-to-all: waits behind whatever this rank's link still carries), the experts (a
  rank with more rows takes longer and the combine waits for the slowest rank), combine
  (blocking);
- stale call: counts posted on their own group after the router (arrival: every rank's post +
  latency, plus at most ``hol_bytes`` queued ahead of them), shared expert, own dispatch posted at
  once if the counts landed, else after waiting the source, else after the experts (token_combine);
  every own dispatch flushes the combine outbox behind it (one FIFO per rank); the experts run on
  the source tokens (displaced: this layer's previous-step dispatch; interweaved: the ring
  predecessor's dispatch of this step, the ring head's the tail's of the previous step); the
  combine it produces goes into the outbox; then the call waits for the combine it consumes
  (displaced: computed one step ago from tokens two steps old; interweaved: of its own previous
  step's tokens). Whose tokens a call computes and which combine it consumes are the schedule's
  answers (``Schedule.call``), not derived here;
- a sync step drains (every rank waits until every link is idle); so does the end of the batch;
- conditional communication: a skipping call sends half the rows and computes half the expert rows;
- SP: sync SP gathers each layer's K/V blocking; displaced SP posts one gather per bucket of
  ``bucket`` layers at the bucket's last layer and waits for it at the bucket's first layer one
  step later (sync steps gather blocking); every step ends with a blocking gather of x. A
  blocking gather over 2 ranks moves at the lone gather rate, over more at the pipelined rate
  (``gather_rate``: gloo's all-gather is a ring).

Link: one egress FIFO per rank (bandwidth, per-message latency). On the emulated links of
``dice-ds bench`` three measured effects are modelled (docs/plan.md "Link"): a lone exchange (a
blocking collective, or an async one with nothing queued behind it) moves at the probe's lone
throughput per direction while the other direction also sends, and at the full rate once it is
the only direction left (``lone_exchange``; a second exchange queued behind a lone one lifts both
to the pipelined rate); a rank's dispatch egress follows the other ranks' loads and its combine
its own; and compute runs slower while the rank's link moves bytes (``Link.cpu_per_byte``: the
network path takes CPU from compute on the 2-core machine). When the ranks outnumber the cores
(``cores``), the g ranks of one collective move at most cores / (g x ``Link.cpu_own_per_byte``)
bytes/s each (``presets.cpu_bound``: the network path alone keeps the cores busy; g = the EP
group for the all-to-alls, the SP group for the gathers). Not modelled: scheduling noise between
ranks sharing cores (but a sync call's expert phase, where every rank starts together after the
blocking dispatch, shares the cores by processor sharing when the ranks outnumber them), per-peer
link asymmetry beyond the loads, ingress limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dice_ds.plan.costs import LayerCosts
from dice_ds.plan.presets import Link, cpu_bound
from dice_ds.schedule import Schedule
from dice_ds.workload import Messages

Loads = Callable[[int, int], list]
"""(step, layer) -> per-rank expert-row multiplier (1.0 = mean load)."""


@dataclass
class SimResult:
    seconds: float
    """batch time: the slowest rank at the end of the batch."""
    compute: float
    """compute seconds of the slowest rank (no waiting)."""
    bytes_per_rank: float
    stalls: dict

    @property
    def comm_share(self) -> float:
        return max(0.0, 1.0 - self.compute / self.seconds) if self.seconds else 0.0


def lone_exchange(starts: list, sizes: list, bw: float, lone_bw: float) -> list:
    """End times of one exchange whose ranks start sending ``sizes`` bytes at ``starts`` on idle
    links: each direction moves at ``lone_bw`` while another direction is also sending and at
    ``bw`` while it is the only one (the emulated links: a lone all-to-all in both directions at
    once gets the probe's lone throughput, docs/plan.md "Link"). One rank stands for a symmetric
    group: its peers send the same bytes at the same time."""
    n = len(sizes)
    if n == 1:
        return [starts[0] + sizes[0] / lone_bw]
    left, ends = list(sizes), list(starts)
    now = min(starts)
    while any(x > 0 for x in left):
        active = [r for r in range(n) if starts[r] <= now and left[r] > 0]
        waiting = [starts[r] for r in range(n) if starts[r] > now and left[r] > 0]
        if not active:
            now = min(waiting)
            continue
        rate = lone_bw if len(active) > 1 else bw
        step = min([left[r] / rate for r in active] + [t - now for t in waiting])
        for r in active:
            left[r] -= rate * step
            if left[r] <= 1e-9:
                left[r], ends[r] = 0.0, now + step
        now += step
    return ends


def gather_rate(link: Link, group: int) -> float:
    """Bytes/s per rank of a blocking all-gather over ``group`` ranks. gloo's all-gather is a ring
    (each rank sends to the next and receives from the previous, two half chunks in flight): at 2
    ranks its one connection carries both directions at once, a lone exchange
    (``Link.gather_bandwidth``); beyond 2 every connection carries one direction and the chunks
    queue behind each other: the pipelined rate (``Link.bandwidth``)."""
    return link.bandwidth if group > 2 else (link.gather_bandwidth or link.lone_rate)


def shared_cores(sizes: list, cores: float) -> list:
    """Seconds until each of ``len(sizes)`` CPU jobs that start together is done when they share
    ``cores`` cores (processor sharing: while k > cores jobs run, each runs at cores / k of a
    core; a job that is done frees its share). ``sizes`` are seconds on a core of its own."""
    order = sorted(range(len(sizes)), key=lambda r: sizes[r])
    done, now, progress = [0.0] * len(sizes), 0.0, 0.0
    for i, r in enumerate(order):
        running = len(sizes) - i
        rate = min(1.0, cores / running)
        now += (sizes[r] - progress) / rate
        progress = sizes[r]
        done[r] = now
    return done


class _Ranks:
    def __init__(self, n: int, link: Link, cores: float = 0.0):
        self.n, self.link, self.cores = n, link, cores
        self.t = [0.0] * n
        self.free = [0.0] * n
        self.lone = [False] * n
        self.compute = [0.0] * n
        self.outbox: list[list] = [[] for _ in range(n)]
        self.bytes = [0.0] * n
        self.stalls: dict[str, float] = {}

    def work(self, r: int, sec: float) -> None:
        self.compute[r] += sec
        lk = self.link
        # bytes/s this rank sends + receives while its link is busy (the peers mirror it)
        moving = 2 * (lk.lone_rate if self.lone[r] else lk.bandwidth)
        k = lk.cpu_per_byte * moving
        busy = self.free[r] - self.t[r]
        if k > 0 and busy > 0:   # slower while the link carries this rank's bytes
            sec = sec * (1 + k) if sec * (1 + k) <= busy else busy + sec - busy / (1 + k)
        self.t[r] += sec

    def wait(self, r: int, until: float, why: str) -> None:
        if until > self.t[r]:
            self.stalls[why] = self.stalls.get(why, 0.0) + (until - self.t[r]) / self.n
            self.t[r] = until

    def send(self, r: int, at: float, nbytes: float) -> float:
        """Queue ``nbytes`` on rank r's egress at time ``at``; returns the arrival time."""
        if nbytes <= 0:
            return at
        bw, bw1 = self.link.bandwidth, self.link.lone_rate
        if at < self.free[r] and self.lone[r]:   # a second exchange joins: the first speeds up
            self.free[r] = at + (self.free[r] - at) * bw1 / bw
        self.lone[r] = at >= self.free[r]
        start = max(at, self.free[r])
        self.free[r] = start + nbytes / (bw1 if self.lone[r] else bw)
        self.bytes[r] += nbytes
        return self.free[r] + self.link.latency

    def hol(self, r: int, at: float) -> float:
        backlog = max(0.0, self.free[r] - at) * self.link.bandwidth
        return min(backlog, self.link.hol_bytes) / self.link.bandwidth

    def flush(self, r: int, at: float, arrivals: dict) -> None:
        for key, nbytes in self.outbox[r]:
            arrivals.setdefault(key, [0.0] * self.n)[r] = self.send(r, at, nbytes)
        self.outbox[r].clear()

    def blocking(self, nbytes: list, why: str, lone_bw: float = 0.0) -> None:
        """A blocking collective at the current point: done when the last piece arrives."""
        lone_bw = lone_bw or self.link.single_bandwidth
        if lone_bw and all(self.free[r] <= self.t[r] for r in range(self.n)):
            ends = lone_exchange(self.t, nbytes, self.link.bandwidth, lone_bw)
            for r in range(self.n):
                self.bytes[r] += nbytes[r]
                self.free[r], self.lone[r] = ends[r], False
            done = max(ends) + self.link.latency
        else:
            done = max(self.send(r, self.t[r], nbytes[r]) for r in range(self.n))
        done = max(done, max(self.t) + self.link.latency)
        for r in range(self.n):
            self.wait(r, done, why)

    def small(self, why: str) -> None:
        """A blocking exchange of a few bytes (a sync call's counts): latency plus ``hol_bytes``
        (on an emulated link the previous exchange's tail is still in the kernel's queues when
        the collective returns: measured, docs/plan.md)."""
        lk = self.link
        done = max(self.t) + lk.latency + lk.hol_bytes / lk.bandwidth
        for r in range(self.n):
            self.wait(r, done, why)

    def drain(self, arrivals: dict) -> None:
        for r in range(self.n):
            self.flush(r, self.t[r], arrivals)
        idle = max(max(self.free) + self.link.latency, max(self.t))
        for r in range(self.n):
            self.wait(r, idle, "drain")


def simulate(sched: Schedule, costs: LayerCosts, msgs: Messages, link: Link, *, ranks: int,
             loads: Loads | None = None, bucket: int = 4, cores: float = 0.0,
             sp_link: Link | None = None) -> SimResult:
    """One batch of ``sched.num_steps`` steps on ``ranks`` EP ranks (1 for DP / pure SP).
    ``sp_link``: the link of the blocking SP gathers when it is not ``link`` (the SP groups of a
    two-level fabric, ``dice_ds.plan.fabric``).
    ``cores`` > 0: the ranks share that many cores (the emulated bench; ``costs`` already count
    the share of a core every rank gets while all compute, ``ranks / cores``), which a sync
    call's unequal expert work changes (``_sync``)."""
    S, L = sched.num_steps, sched.depth
    gather_bw = gather_rate(cpu_bound(sp_link or link, sched.sp_size, cores), sched.sp_size)
    link = cpu_bound(link, max(ranks, sched.sp_size), cores)
    R = _Ranks(ranks, link, cores)
    ones = [1.0] * ranks
    load = loads or (lambda i, l: ones)
    disp: dict = {}
    comb: dict = {}
    kv: dict = {}
    ep = msgs.dispatch > 0
    for i in range(S, 0, -1):
        if sched.ep_sync_step(i) and sched.async_layers:
            R.drain(comb)
        sp_sync = sched.sp_sync_step(i) if sched.sp_size > 1 else True
        for l in range(L):
            _attention(R, sched, costs, msgs, kv, i, l, sp_sync, bucket, gather_bw)
            skip = 0.5 if sched.skips(i, l) else 1.0
            if not ep:
                for r in range(ranks):
                    R.work(r, costs.router + costs.shared + costs.post
                           + costs.experts * skip * load(i, l)[r])
            elif sched.ep_stale(i, l):
                _stale(R, sched, costs, msgs, disp, comb, load, i, l, skip)
            elif sched.call(i, l).overlap:
                _overlapped(R, costs, msgs, comb, load(i, l), skip)
            else:
                _sync(R, costs, msgs, comb, load(i, l), skip)
        if sched.sp_size > 1:
            R.blocking([msgs.x] * ranks, "x gather", gather_bw)
    R.drain(comb)
    slow = max(range(ranks), key=lambda r: R.t[r])
    return SimResult(seconds=R.t[slow], compute=max(R.compute),
                     bytes_per_rank=max(R.bytes), stalls=R.stalls)


def _attention(R: _Ranks, sched, costs, msgs, kv, i, l, sp_sync, bucket, gather_bw) -> None:
    for r in range(R.n):
        R.work(r, costs.attn)
    if sched.sp_size <= 1:
        return
    if sp_sync:
        R.blocking([msgs.kv] * R.n, "kv gather", gather_bw)
        return
    b = l // bucket
    if l % bucket == 0 and (i + 1, b) in kv:
        for r in range(R.n):
            R.wait(r, kv[(i + 1, b)], "kv wait")
    if l % bucket == bucket - 1 or l == sched.depth - 1:
        size = msgs.kv * (l - b * bucket + 1)
        kv[(i, b)] = max(R.send(r, R.t[r], size) for r in range(R.n))


def _others(load: list, r: int) -> float:
    """Rank r's dispatch egress relative to the mean: it sends each other rank s about that
    rank's share of the rows (rank s computes load[s] x the mean rows, from all ranks alike)."""
    rest = [x for s, x in enumerate(load) if s != r]
    return sum(rest) / len(rest) if rest else 1.0


def _sync(R: _Ranks, costs, msgs, comb, load, skip) -> None:
    n = R.n
    for r in range(n):
        R.flush(r, R.t[r], comb)
        R.work(r, costs.router)
    R.small("counts")
    for r in range(n):
        R.work(r, costs.shared)
    R.blocking([msgs.dispatch * skip * _others(load, r) for r in range(n)], "dispatch")
    work = [costs.experts * skip * load[r] for r in range(n)]
    if R.cores and n > R.cores:
        # every rank starts its experts at the end of the same blocking dispatch; a rank that is
        # done waits in the combine and leaves its core to the busier ones, so the busiest
        # finishes sooner than its load times the all-busy share (ranks / cores)
        share = n / R.cores
        work = shared_cores([x / share for x in work], R.cores)
    for r in range(n):
        R.work(r, work[r])
    R.blocking([msgs.combine * skip * load[r] for r in range(n)], "combine")
    for r in range(n):
        R.work(r, costs.post)


def _route_post_counts(R: _Ranks, costs, flush=None) -> float:
    """Every rank runs its router (after flushing ``flush``, a combine outbox) and posts its
    counts; returns when the last rank's counts have landed (post + head-of-line bytes +
    latency)."""
    post_t = []
    for r in range(R.n):
        if flush is not None:
            R.flush(r, R.t[r], flush)
        R.work(r, costs.router)
        post_t.append(R.t[r])
    return max(t + R.hol(r, t) for r, t in enumerate(post_t)) + R.link.latency


def _overlapped(R: _Ranks, costs, msgs, comb, load, skip) -> None:
    """An overlapped sync call (``Call.overlap``, ``DiceRuntime._overlapped``): both halves'
    counts posted after the router, the shared expert while they land, both dispatches posted
    back to back, then per half: wait its dispatch, its experts, post its combine (queued behind
    whatever the link still carries); the call ends when both combines have arrived."""
    n = R.n
    counts = _route_post_counts(R, costs, flush=comb)
    for r in range(n):
        R.work(r, costs.shared)
        R.wait(r, counts, "wait counts")
    arrive = [[0.0] * n, [0.0] * n]
    for h in (0, 1):
        for r in range(n):
            arrive[h][r] = R.send(r, R.t[r], msgs.dispatch * skip * _others(load, r) / 2)
    back = [0.0] * n
    for h in (0, 1):
        ready = max(arrive[h])
        for r in range(n):
            R.wait(r, ready, "wait dispatch")
            R.work(r, costs.experts * skip * load[r] / 2)
            back[r] = max(back[r], R.send(r, R.t[r], msgs.combine * skip * load[r] / 2))
    done = max(back)
    for r in range(n):
        R.wait(r, done, "wait combine")
        R.work(r, costs.post)


def _stale(R: _Ranks, sched, costs, msgs, disp, comb, load, i, l, skip) -> None:
    n = R.n
    call = sched.call(i, l)  # the schedule's answers: whose tokens run here, whose come back
    src_step, src_layer = call.computes
    # the combine consumed: keyed by the tokens it carries; none to wait on when a sync call kept
    # it (its exchange already completed) or when it is this call's own (posted just below)
    need = None if sched.ep_sync_step(call.computed_at) else (call.returns, l)
    src_skip = 0.5 if sched.skips(src_step, src_layer) else 1.0
    src_load = load(src_step, src_layer)
    here = load(i, l)
    posted = [False] * n
    counts = _route_post_counts(R, costs)
    mine = disp.setdefault((i, l), [0.0] * n)

    def post(r):
        mine[r] = R.send(r, R.t[r], msgs.dispatch * skip * _others(here, r))
        R.flush(r, R.t[r], comb)
        posted[r] = True

    for r in range(n):
        R.work(r, costs.shared)
        if counts <= R.t[r]:
            post(r)
    src = max(disp.get((src_step, src_layer), [0.0]))
    for r in range(n):
        R.wait(r, src, "wait dispatch")
        if not posted[r] and counts <= R.t[r]:
            post(r)
    for r in range(n):
        R.work(r, costs.experts * src_skip * src_load[r])
        if not posted[r]:
            R.wait(r, counts, "wait counts")
            post(r)
        R.outbox[r].append(((src_step, src_layer), msgs.combine * src_skip * src_load[r]))
    for r in range(n):
        if need is not None and any(key == need for key, _ in R.outbox[r]):
            R.flush(r, R.t[r], comb)
    arrive = max(comb.get(need, [0.0])) if need is not None else 0.0
    for r in range(n):
        R.wait(r, arrive, "wait combine")
        R.work(r, costs.post)
