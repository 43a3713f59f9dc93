"""The machine's speed over a simulated run, against the profile it was measured in.

A served engine's loop cycles take some multiple of the profile's model of them, and on a
shared machine that multiple wanders: within one 24-s replay on the dev VM, one-second
windows ran x0.96-1.53 their model (lag-1 correlation 0.77), around x1.22 over the whole
replay. ``emoe fidelity --engine-speed served`` simulates the whole replay at its one overall
multiple; ``--engine-speed timeline`` at the multiple of each window, as measured during the
replay (``emoe.rpc.fidelity``): the slow patches that build the measured run's queues then
come at the same moments in the simulated one.

Steps that run a prompt chunk may run at another multiple than decode-only steps: the
profile's fit of a cycle (``serving.engine_scale`` x the step model + per step + per token)
splits it between the engine and the serving loop as they ran in the minute it was measured,
and a prefill step is mostly engine, a decode step mostly loop. In one replay the loop's
cycles ran x0.85 their model while its engine's compute ran x1.07 its step model, and the
simulated TTFT came 20-30% short at every prompt size.

A window's speed scales a cycle's whole model, so it matches the window's mean cycle but not
how a cycle grows with its decode batch: as served (code trace, fcfs/all, one replay) a
decode-only cycle ran 5.41 ms + 1.23 ms per decode where the window-scaled model gave 5.74 +
0.94. A timeline from sampled sums can also fit, over the whole run, what each token
streamed in a decode-only step costs beyond its model (``decode_token_s``, at the profile's
speed: the window's speed scales it too), from how the cycles grow with their tokens within
each window. ``emoe fidelity`` reports it and simulates without it: simulated with it, one
benchmark run came no closer, and the fitted cost moved from -80 to +470 us between replays
(docs/fidelity.md, limit 16).

Accepting a request costs the served loop too (its Generate handler and the hand-over to the
scheduler run in the loop's interpreter), and that work lands in the cycle just before the
step that admits the request, the one Eq. 3 decides on: ``arrival_s``, fitted from the cycles
in which the loop accepted requests against the others of their window, can be simulated as
loop time per request accepted while the loop was busy, and taken out of the windows' speeds.
``emoe fidelity`` simulated it so in sessions 9-14; it now reports it and leaves it in the
windows' speeds, which came closer to the replays (docs/fidelity.md, "Runs of session 15").

Steps that fetch experts on a miss (``lru``) cost the fetches beyond their model, and under
``lru`` they are most steps, every prompt step among them: ``fetch_s``, fitted from those
cycles against the window's decode-only cycles without a fetch, is what a fetch cost the loop
(simulated as the copy's cost, at no window's speed), and with it those cycles count towards
their windows' speeds, of their kind. Without them an ``lru`` replay's prompt steps ran at the
one overall speed of its decode-only steps, measured on the ~10% of them that fetched nothing.

A prompt step's model comes from the profile's step table, whose points each carry the minute
they were measured in; as served, the steps of one range of prompt sizes can run a few percent
to 15% off the table against the others (``PrefillShape``, measured per table segment by the
server): a timeline may carry that shape, by which every prompt step's time is scaled (and
the windows' prefill speeds are taken against the model so shaped).

Within a window the cycles still scatter (log sigma 0.13-0.36 per replay on the dev VMs), and
that widens every tail: ``StepScatter`` draws each simulated step around its model as the
server measured its cycles to scatter within the windows of the replay.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from emoe.core.errors import ConfigError

PRIOR_S = 0.1
"""Seconds of modelled cycles a window's own speed must outweigh: a window in which the loop
was mostly idle keeps close to the run's overall speed."""


@dataclass(frozen=True, slots=True)
class PrefillShape:
    """How much slower than the run's prompt steps overall the steps of each range of prompt
    tokens ran against their model: ``factors[i]`` for steps of more than ``tokens[i - 1]``
    and up to ``tokens[i]`` prompt tokens (the profile's step table's points), the last one
    for steps past the table."""

    tokens: tuple[int, ...]
    factors: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.factors) != len(self.tokens) + 1:
            raise ConfigError(f"prefill shape: {len(self.factors)} factors for "
                              f"{len(self.tokens)} table points (one more needed)")
        if any(b <= a for a, b in zip(self.tokens, self.tokens[1:])):
            raise ConfigError(f"prefill shape: table points must ascend, got {self.tokens}")
        for factor in self.factors:
            if not (factor > 0 and math.isfinite(factor)):
                raise ConfigError(f"prefill shape: factors must be positive, got {factor!r}")

    def factor(self, prompt_tokens: int) -> float:
        """The factor of a step of ``prompt_tokens`` prompt tokens."""
        return self.factors[bisect.bisect_left(self.tokens, prompt_tokens)]

    @classmethod
    def from_sums(cls, tokens: Sequence[int], cycle_s: Sequence[float],
                  modelled_s: Sequence[float], prior_s: float = PRIOR_S) -> PrefillShape | None:
        """From the run's prompt steps' cycles and their model summed by segment (a served
        loop's ``prefill_segment_*`` over the run): each segment's ratio against the run's
        overall one, shrunk towards 1 by ``prior_s`` of modelled time (a segment with few
        steps keeps close to the table). None: no prompt step was counted."""
        if len(cycle_s) != len(tokens) + 1 or len(modelled_s) != len(cycle_s):
            raise ConfigError(f"prefill shape: {len(cycle_s)} and {len(modelled_s)} sums for "
                              f"{len(tokens)} table points")
        modelled = sum(modelled_s)
        overall = sum(cycle_s) / modelled if modelled > 0 else 0.0
        if overall <= 0:
            return None
        return cls(tuple(int(t) for t in tokens),
                   tuple((max(0.0, c) + prior_s * overall) / (m + prior_s) / overall
                         for c, m in zip(cycle_s, modelled_s)))

    def shaped(self, segment_modelled_s: Sequence[Sequence[float]]) -> list[float]:
        """What the factors add to the model, sample by sample, given the segments'
        cumulative model at each sample (one sequence of segments per sample)."""
        return [sum((f - 1.0) * m for f, m in zip(self.factors, sample))
                for sample in segment_modelled_s]

    def describe(self) -> str:
        """The factors off 1 by half a percent or more, by their range of prompt tokens."""
        bounds = [f"<={self.tokens[0]}"] + [f"{a + 1}-{b}" for a, b in
                                             zip(self.tokens, self.tokens[1:])]
        bounds.append(f">{self.tokens[-1]}")
        off = [f"{b} x{f:.2f}" for b, f in zip(bounds, self.factors) if abs(f - 1.0) >= 0.005]
        return ", ".join(off) if off else "all within 0.5% of the table"


@dataclass(frozen=True, slots=True)
class SpeedTimeline:
    """From ``starts[i]`` (seconds from the run's start; the first is 0) on, the engine and the
    serving path take ``speeds[i]`` x their profile's time; steps that run a prompt chunk
    ``prefill_speeds[i]`` x (default: ``speeds``). A decode-only step's serving path also
    takes ``decode_token_s`` per token it streams beyond the profile's (at the window's speed
    too), and the loop ``arrival_s`` (x ``speeds[i]``) per request it accepts while busy.
    ``fetch_s``: what an expert fetched on a miss cost the loop, with which the cycles that
    fetched counted towards the speeds (None: they did not); ``fetch_fitted``: whether it was
    fitted from those cycles (else it was the cost given). ``prefill_shape``: a prompt step
    also takes its prompt size's factor (None: 1)."""

    starts: tuple[float, ...]
    speeds: tuple[float, ...]
    prefill_speeds: tuple[float, ...] | None = None
    decode_token_s: float = 0.0
    arrival_s: float = 0.0
    fetch_s: float | None = None
    fetch_fitted: bool = False
    prefill_shape: PrefillShape | None = None

    def __post_init__(self) -> None:
        if not self.speeds or len(self.starts) != len(self.speeds):
            raise ConfigError(f"engine speed: {len(self.starts)} window starts for "
                              f"{len(self.speeds)} speeds")
        if self.prefill_speeds is not None and len(self.prefill_speeds) != len(self.speeds):
            raise ConfigError(f"engine speed: {len(self.prefill_speeds)} prefill speeds for "
                              f"{len(self.speeds)} windows")
        if self.starts[0] != 0.0 or any(b <= a for a, b in zip(self.starts, self.starts[1:])):
            raise ConfigError("engine speed: window starts must ascend from 0, got "
                              f"{list(self.starts[:4])}...")
        for speed in self.speeds + (self.prefill_speeds or ()):
            if not (speed > 0 and math.isfinite(speed)):
                raise ConfigError(f"engine speed: must be a positive number, got {speed!r}")
        if not math.isfinite(self.decode_token_s):
            raise ConfigError(f"engine speed: a finite decode_token_s, got "
                              f"{self.decode_token_s!r}")
        if not (self.arrival_s >= 0 and math.isfinite(self.arrival_s)):
            raise ConfigError(f"engine speed: arrival_s must be a non-negative number, got "
                              f"{self.arrival_s!r}")
        if self.fetch_s is not None and not (self.fetch_s >= 0 and math.isfinite(self.fetch_s)):
            raise ConfigError(f"engine speed: fetch_s must be a non-negative number, got "
                              f"{self.fetch_s!r}")

    @classmethod
    def constant(cls, speed: float) -> SpeedTimeline:
        return cls((0.0,), (float(speed),))

    @classmethod
    def from_samples(cls, times: Sequence[float], cycle_s: Sequence[float],
                     modelled_s: Sequence[float],
                     prefill_cycle_s: Sequence[float] | None = None,
                     prefill_modelled_s: Sequence[float] | None = None,
                     decode_lines: Sequence[Sequence[float]] | None = None,
                     token_floor_s: float = 0.0,
                     arrivals: Sequence[Sequence[float]] | None = None,
                     fetches: Sequence[Sequence[float]] | None = None,
                     fetch_fallback_s: float | None = None,
                     prefill_segments: tuple[Sequence[int], Sequence[Sequence[float]],
                                             Sequence[Sequence[float]]] | None = None,
                     prior_s: float = PRIOR_S) -> SpeedTimeline:
        """From cumulative counters sampled during a run: at ``times[i]`` (seconds from its
        start) the loop's cycles had summed ``cycle_s[i]`` against ``modelled_s[i]`` of their
        model, of which the cycles of steps that ran a prompt chunk ``prefill_cycle_s[i]``
        against ``prefill_modelled_s[i]`` (if given: the two kinds then run at their own
        speeds). Each window between samples runs at its own ratio, shrunk towards the run's
        overall one by ``prior_s`` seconds of modelled time. A cycle counts in the window it
        closed in, so of the windows that closed none (an idle loop), the last one before a
        busy window takes that window's speed (the first cycle after a pause began in it) and
        the earlier ones keep the speed before them. The first window starts at 0, the last
        one lasts.

        ``decode_lines`` (with the prefill counters): the decode-only cycles' sums of tokens
        streamed n, n^2, n x cycle and n x model (a served loop's ``decode_streamed``,
        ``decode_streamed_sq``, ``decode_cycle_streamed``, ``decode_model_streamed``): the
        run's ``decode_token_s`` is then fitted (``_token_cost``), no lower than
        ``-token_floor_s`` (the profile's own cost of a token streamed, which it may at most
        cancel), and each decode-only window's speed is its cycles over its model with it.

        ``arrivals``: the requests the loop accepted in counted cycles, those cycles' time and
        model, and the requests accepted in cycles of steps that ran a prompt chunk (a served
        loop's ``arrivals``, ``arrival_cycle_s``, ``arrival_cycle_profiled_s``,
        ``prefill_arrivals``): ``arrival_s`` is then fitted (``_arrival_cost``) and each
        window's model of a kind counts it for the requests accepted in that kind's cycles.

        ``fetches``: the cycles of steps that fetched experts on a miss, kept out of the sums
        above: their time, model, experts fetched and requests accepted, then the same four of
        those that ran a prompt chunk (a served loop's ``fetch_cycle_*`` and
        ``prefill_fetch_cycle_*``). ``fetch_s`` is fitted from the decode-only ones
        (``_fetch_cost``; ``fetch_fallback_s`` where no window had both kinds of decode-only
        cycle) and each cycle that fetched counts towards its kind's speed, less its
        fetches.

        ``prefill_segments`` (with the prefill counters): the table's points, then at every
        sample the prompt steps' cycles and their model by segment (a served loop's
        ``prefill_segment_tokens``, ``prefill_segment_cycle_s`` and
        ``prefill_segment_cycle_profiled_s``): the run's ``prefill_shape`` is then fitted
        (``PrefillShape.from_sums``) and the windows' prefill speeds are taken against the
        model so shaped."""
        columns = [times, cycle_s, modelled_s]
        kinds = prefill_cycle_s is not None and prefill_modelled_s is not None
        if kinds:
            columns += [prefill_cycle_s, prefill_modelled_s]
        if len(times) < 2 or len({len(c) for c in columns}) != 1:
            raise ConfigError(f"engine speed: a timeline needs two or more samples of "
                              f"time, cycles and model alike, got {len(times)}")
        shape = None
        if kinds and prefill_segments is not None:
            shape, added = _shape(*prefill_segments, len(times), prior_s)
            if shape is not None:
                modelled_s = _plus(modelled_s, added)
                prefill_modelled_s = _plus(prefill_modelled_s, added)
        arrival_s = 0.0
        if arrivals is not None:
            if len(arrivals) != 4 or any(len(c) != len(times) for c in arrivals):
                raise ConfigError("engine speed: the arrivals need four sums with a value at "
                                  "every sample")
            accepted, _, _, prefill_accepted = arrivals
            arrival_s = _arrival_cost(cycle_s, modelled_s, *arrivals[:3])
            modelled_s = _plus(modelled_s, accepted, arrival_s)
            if kinds:
                prefill_modelled_s = _plus(prefill_modelled_s, prefill_accepted, arrival_s)
        token_s = 0.0
        if kinds:
            rest = (_plus(cycle_s, prefill_cycle_s, -1.0),
                    _plus(modelled_s, prefill_modelled_s, -1.0))
            prefill = (prefill_cycle_s, prefill_modelled_s)
            if decode_lines is not None:
                if len(decode_lines) != 4 or any(len(c) != len(times) for c in decode_lines):
                    raise ConfigError("engine speed: the decode lines need four sums with a "
                                      "value at every sample")
                token_s = _token_cost(*rest, *decode_lines, floor_s=token_floor_s)
                rest = (rest[0], _plus(rest[1], decode_lines[0], token_s))
        else:
            rest, prefill = (cycle_s, modelled_s), None
        fetch_s, fetch_fitted = None, False
        if fetches is not None:
            if len(fetches) != 8 or any(len(c) != len(times) for c in fetches):
                raise ConfigError("engine speed: the fetch cycles need eight sums with a value "
                                  "at every sample")
            cycles, model, fetched, accepted, *prefill_fetches = fetches
            model = _plus(model, accepted, arrival_s)
            if kinds:
                p_cycles, p_model, p_fetched, p_accepted = prefill_fetches
                p_model = _plus(p_model, p_accepted, arrival_s)
                decode_fetches = (_plus(cycles, p_cycles, -1.0), _plus(model, p_model, -1.0),
                                  _plus(fetched, p_fetched, -1.0))
            else:
                decode_fetches = (cycles, model, fetched)
            fetch_s = _fetch_cost(*rest, *decode_fetches)
            fetch_fitted = fetch_s is not None
            if fetch_s is None:
                fetch_s = fetch_fallback_s
            if fetch_s is not None:
                folded = [_with_fetches(rest, decode_fetches, fetch_s),
                          _with_fetches((cycle_s, modelled_s), (cycles, model, fetched), fetch_s)]
                if kinds:
                    folded.append(_with_fetches(prefill, (p_cycles, p_model, p_fetched),
                                                fetch_s))
                if all(c[-1] > c[0] or m[-1] <= m[0] for c, m in folded):
                    rest, (cycle_s, modelled_s), *kept = folded
                    if kinds:
                        prefill = kept[0]
                else:  # the fetches would take more than the cycles they ran in
                    fetch_s, fetch_fitted = None, False
        if modelled_s[-1] - modelled_s[0] <= 0:
            raise ConfigError("engine speed: the loop ran no modelled cycle between the "
                              "samples")
        everything = _overall(cycle_s, modelled_s, 1.0)
        rest_overall = _overall(*rest, everything)
        prefill_overall = None if prefill is None else _overall(*prefill, everything)
        starts, speeds, prefill_speeds = [], [], []
        for i in range(1, len(times)):
            if modelled_s[i] - modelled_s[i - 1] <= 0:
                continue
            after_idle = i >= 2 and modelled_s[i - 1] - modelled_s[i - 2] <= 0
            start = times[i - 2] if after_idle else times[i - 1]
            starts.append(0.0 if not starts else max(start, starts[-1] + 1e-9))
            speeds.append(_shrunk(*rest, i, rest_overall, prior_s))
            if prefill is not None:
                prefill_speeds.append(_shrunk(*prefill, i, prefill_overall, prior_s))
        return cls(tuple(starts), tuple(speeds),
                   tuple(prefill_speeds) if prefill is not None else None, token_s,
                   arrival_s, fetch_s, fetch_fitted, shape)

    def window(self, t: float) -> int:
        """The window that time ``t`` falls in."""
        return max(0, bisect.bisect_right(self.starts, t) - 1)

    def next_change(self, window: int) -> float:
        """When the window after ``window`` starts (inf: never)."""
        return self.starts[window + 1] if window + 1 < len(self.starts) else math.inf

    def describe(self) -> str:
        """The windows' speeds, p10-p50-p90 (of prefill steps apart where they have their own)."""
        def spread(speeds: tuple[float, ...]) -> str:
            ordered = sorted(speeds)
            return "-".join(f"x{ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.2f}"
                            for q in (0.1, 0.5, 0.9))

        text = f"{len(self.speeds)} windows that ran cycles, p10-p50-p90 {spread(self.speeds)}"
        if self.prefill_speeds is not None:
            text += (f" (decode-only steps and the serving path); steps with a prompt chunk "
                     f"{spread(self.prefill_speeds)}")
        if self.decode_token_s:
            text += (f"; a token streamed in a decode-only step {self.decode_token_s * 1e6:+.0f}"
                     f" us beyond the profile's")
        if self.arrival_s:
            text += f"; the loop's work per request accepted {self.arrival_s * 1e6:.0f} us"
        if self.fetch_s is not None:
            text += (f"; an expert fetched on a miss {self.fetch_s * 1e6:.0f} us "
                     f"({'fitted from the cycles that fetched' if self.fetch_fitted else 'given'})")
        if self.prefill_shape is not None:
            text += (f"; prompt steps by their tokens against the others, as served: "
                     f"{self.prefill_shape.describe()}")
        return text


def _token_cost(cycle_s: Sequence[float], modelled_s: Sequence[float],
                streamed: Sequence[float], streamed_sq: Sequence[float],
                cycle_streamed: Sequence[float], model_streamed: Sequence[float],
                floor_s: float = 0.0, rounds: int = 50) -> float:
    """Seconds per token streamed that a decode-only cycle costs beyond its model: r in
    cycle = S_w (model + r n), one S_w per window and r over the run, from the windows' sums
    (cumulative, sampled) of cycles, model, n, n^2, n x cycle and n x model. Alternately each
    window's S_w is its cycles over its model with r (the timeline's own ratio, which keeps
    the window's mean) and r the least-squares fit given them: how the cycles grow with their
    tokens within the windows. No lower than ``-floor_s``; 0 where no window streamed."""
    columns = (cycle_s, modelled_s, streamed, streamed_sq, cycle_streamed, model_streamed)
    windows = [w for w in zip(*map(_per_window, columns))
               if w[0] > 0 and w[1] > 0 and w[2] > 0]
    r = 0.0
    for _ in range(rounds):
        num = den = 0.0
        for c, m, n, nn, cn, mn in windows:
            speed = c / (m + r * n)
            num += speed * cn - speed * speed * mn
            den += speed * speed * nn
        if den <= 0:
            return 0.0
        updated = max(-floor_s, num / den)
        if abs(updated - r) < 1e-9:
            return updated
        r = updated
    return r


def _arrival_cost(cycle_s: Sequence[float], modelled_s: Sequence[float],
                  accepted: Sequence[float], arrival_cycle_s: Sequence[float],
                  arrival_modelled_s: Sequence[float]) -> float:
    """Seconds of the loop's work per request accepted, at the profile's speed: in each window,
    the cycles in which the loop accepted requests beyond their model at the speed of the
    window's other cycles, summed over the windows, over those requests at that speed (no
    less than 0; 0 where no window had both kinds of cycle)."""
    columns = (cycle_s, modelled_s, accepted, arrival_cycle_s, arrival_modelled_s)
    excess = weight = 0.0
    for c, m, n, ac, am in zip(*map(_per_window, columns)):
        if n <= 0 or m - am <= 0 or c - ac <= 0:
            continue
        speed = (c - ac) / (m - am)
        excess += ac - speed * am
        weight += speed * n
    return max(0.0, excess / weight) if weight > 0 else 0.0


def _fetch_cost(cycle_s: Sequence[float], modelled_s: Sequence[float],
                fetch_cycle_s: Sequence[float], fetch_modelled_s: Sequence[float],
                fetched: Sequence[float]) -> float | None:
    """Seconds per expert fetched on a miss that a cycle costs beyond its model: in each
    window, the cycles that fetched beyond their model at the speed of the window's cycles of
    the same kind that fetched nothing, summed over the windows, over the experts fetched (no
    less than 0; None where no window had both kinds of cycle). Not scaled by the window's
    speed: the simulator's copies are not."""
    columns = (cycle_s, modelled_s, fetch_cycle_s, fetch_modelled_s, fetched)
    excess = weight = 0.0
    for c, m, fc, fm, n in zip(*map(_per_window, columns)):
        if n <= 0 or m <= 0 or c <= 0:
            continue
        excess += fc - c / m * fm
        weight += n
    return max(0.0, excess / weight) if weight > 0 else None


def _with_fetches(kind: tuple[Sequence[float], Sequence[float]],
                  fetches: tuple[Sequence[float], ...], fetch_s: float
                  ) -> tuple[list[float], list[float]]:
    """A kind's cumulative cycles and model with its cycles that fetched, less their fetches."""
    (cycles, model), (f_cycles, f_model, fetched) = kind, fetches
    return _plus(_plus(cycles, f_cycles), fetched, -fetch_s), _plus(model, f_model)


def _per_window(sums: Sequence[float]) -> tuple[float, ...]:
    """What a cumulative sum, sampled, added in each window between samples."""
    return tuple(b - a for a, b in zip(sums, sums[1:]))


def _shape(tokens: Sequence[int], cycle_s: Sequence[Sequence[float]],
           modelled_s: Sequence[Sequence[float]], samples: int, prior_s: float
           ) -> tuple[PrefillShape | None, list[float]]:
    """The run's prefill shape from the segments' sums at every sample, and what it adds to
    the model at every sample (None and nothing: a run that summed no segments)."""
    segments = len(tokens) + 1
    if not tokens or len(cycle_s) != samples or len(modelled_s) != samples \
            or any(len(c) != segments for c in (*cycle_s, *modelled_s)):
        return None, []
    shape = PrefillShape.from_sums(tokens, [b - a for a, b in zip(cycle_s[0], cycle_s[-1])],
                                   [b - a for a, b in zip(modelled_s[0], modelled_s[-1])],
                                   prior_s)
    if shape is None:
        return None, []
    return shape, shape.shaped(modelled_s)


def _plus(a: Sequence[float], b: Sequence[float], times: float = 1.0) -> list[float]:
    """``a`` + ``times`` x ``b``, sample by sample."""
    return [x + times * y for x, y in zip(a, b)]


def _overall(cycle_s: Sequence[float], modelled_s: Sequence[float], default: float) -> float:
    modelled = modelled_s[-1] - modelled_s[0]
    return (cycle_s[-1] - cycle_s[0]) / modelled if modelled > 0 else default


def _shrunk(cycle_s: Sequence[float], modelled_s: Sequence[float], i: int, overall: float,
            prior_s: float) -> float:
    """Window ``i``'s ratio, shrunk towards ``overall`` by ``prior_s`` of modelled time (its
    cycles no fewer than none: a run's fetch cost can exceed what one window's fetches took)."""
    cycles, model = cycle_s[i] - cycle_s[i - 1], modelled_s[i] - modelled_s[i - 1]
    return (max(0.0, cycles) + prior_s * overall) / (model + prior_s)


@dataclass(frozen=True, slots=True)
class StepScatter:
    """How a step's time scatters around its model x its window's speed: the log of the
    multiple is an AR(1) series over consecutive steps with lag-1 correlation ``lag1``, its
    spread ``sigma`` (steps that run a prompt chunk: ``prefill_sigma``, default ``sigma``),
    its centre ``centre`` (``prefill_centre``): the typical step's log multiple, as measured;
    None: -sigma^2 / 2, a draw of mean 1, which keeps the window's speed on average."""

    sigma: float = 0.0
    prefill_sigma: float | None = None
    lag1: float = 0.0
    centre: float | None = None
    prefill_centre: float | None = None

    def __post_init__(self) -> None:
        for name in ("sigma", "prefill_sigma"):
            value = getattr(self, name)
            if value is not None and not (0.0 <= value < 1.0):
                raise ConfigError(f"step scatter: a sigma in [0, 1), got {name}={value!r}")
        if not -1.0 < self.lag1 < 1.0:
            raise ConfigError(f"step scatter: a lag-1 correlation in (-1, 1), got "
                              f"{self.lag1!r}")
        for name in ("centre", "prefill_centre"):
            value = getattr(self, name)
            if value is not None and not -1.0 < value < 1.0:
                raise ConfigError(f"step scatter: a centre in (-1, 1), got {name}={value!r}")

    @property
    def drawn(self) -> bool:
        return self.sigma > 0 or bool(self.prefill_sigma)

    def sigma_of(self, prefill: bool) -> float:
        return self.prefill_sigma if prefill and self.prefill_sigma is not None else self.sigma

    def centre_of(self, prefill: bool) -> float:
        centre = self.prefill_centre if prefill and self.prefill_sigma is not None \
            else self.centre
        if centre is None:
            sigma = self.sigma_of(prefill)
            return -sigma * sigma / 2
        return centre

    @classmethod
    def from_samples(cls, log_sum: Sequence[float], log_sq_sum: Sequence[float],
                     cycles: Sequence[int], lag_pairs: Sequence[int],
                     lag_sum: Sequence[float], cycle_s: Sequence[float],
                     modelled_s: Sequence[float],
                     prefill: Sequence[Sequence[float]] | None = None) -> StepScatter:
        """From cumulative sums sampled during a run (a served loop's ``cycle_log_*``,
        ``cycles``, ``cycle_lag_*``, ``cycle_s`` and ``cycle_profiled_s``,
        ``emoe.rpc.engine_speed``; ``prefill``: the same seven of the cycles that ran a prompt
        chunk, which the first seven include): the spread of each window's cycles around that
        window's own mean log, pooled over the windows, prefill and decode-only cycles apart;
        their lag-1 correlation, pooled over both kinds; and where the typical cycle sits
        against the window's speed (its sum of cycles over its sum of model): the mean log
        ratio less the log of that speed, pooled over the windows. The slower drift from
        window to window is the timeline's; this is what scatters within a window."""
        total = _Moments.of(log_sum, log_sq_sum, cycles, lag_pairs, lag_sum, cycle_s,
                            modelled_s)
        if prefill is None:
            decode, prefilled = total, None
        else:
            prefilled = _Moments.of(*prefill)
            decode = total.minus(prefilled)
        sigma = decode.sigma() or 0.0
        prefill_sigma = None if prefilled is None else prefilled.sigma()
        kinds = [(decode, sigma)] + ([(prefilled, prefill_sigma)] if prefill_sigma else [])
        covariance = sum(m.lag_covariance() for m, _ in kinds)
        variance = sum(m.lag_weight() * s * s for m, s in kinds)
        lag1 = min(0.95, max(-0.95, float(covariance / variance))) if variance > 0 else 0.0
        return cls(min(sigma, 0.99), None if not prefill_sigma else min(prefill_sigma, 0.99),
                   lag1, _bounded(decode.centre()),
                   _bounded(prefilled.centre()) if prefill_sigma else None)

    def describe(self) -> str:
        def kind(prefill: bool) -> str:
            return (f"log sigma {self.sigma_of(prefill):.3f}, the typical step "
                    f"x{math.exp(self.centre_of(prefill)):.3f} its window's speed")

        text = kind(False)
        if self.prefill_sigma is not None:
            text += f" (steps with a prompt chunk: {kind(True)})"
        return text + f"; lag-1 correlation {self.lag1:+.2f}"


def _bounded(centre: float | None) -> float | None:
    return None if centre is None else min(0.99, max(-0.99, centre))


@dataclass(frozen=True, slots=True)
class _Moments:
    """Per window: cycles n, sum and sum of squares of their log ratios, pairs of consecutive
    cycles and the sum of their products, the cycles' time and their model's."""

    n: tuple[float, ...]
    s1: tuple[float, ...]
    s2: tuple[float, ...]
    pairs: tuple[float, ...]
    lag: tuple[float, ...]
    time: tuple[float, ...]
    model: tuple[float, ...]

    @classmethod
    def of(cls, log_sum, log_sq_sum, cycles, lag_pairs, lag_sum, cycle_s,
           modelled_s) -> _Moments:
        columns = (cycles, log_sum, log_sq_sum, lag_pairs, lag_sum, cycle_s, modelled_s)
        if len({len(c) for c in columns}) != 1 or len(cycles) < 2:
            raise ConfigError("step scatter: two or more samples of every sum needed")
        return cls(*map(_per_window, columns))

    def minus(self, other: _Moments) -> _Moments:
        return _Moments(*(tuple(a - b for a, b in zip(x, y))
                          for x, y in zip(self.fields(), other.fields())))

    def fields(self) -> tuple[tuple[float, ...], ...]:
        return self.n, self.s1, self.s2, self.pairs, self.lag, self.time, self.model

    def centre(self) -> float | None:
        """The cycles' mean log ratio less the log of their window's speed, pooled over the
        windows by cycles (None: no window with cycles)."""
        offset = count = 0.0
        for n, s1, time, model in zip(self.n, self.s1, self.time, self.model):
            if n >= 1 and time > 0 and model > 0:
                offset += s1 - n * math.log(time / model)
                count += n
        return offset / count if count else None

    def sigma(self) -> float | None:
        """Pooled within-window standard deviation (None: too few cycles)."""
        squares = dof = 0.0
        for n, s1, s2 in zip(self.n, self.s1, self.s2):
            if n >= 2:
                squares += max(0.0, s2 - s1 * s1 / n)
                dof += n - 1
        return math.sqrt(squares / dof) if dof > 0 else None

    def lag_covariance(self) -> float:
        """Sum over windows of the consecutive pairs' products about the window's mean."""
        return sum(lag - pairs * (s1 / n) ** 2
                   for n, s1, pairs, lag in zip(self.n, self.s1, self.pairs, self.lag)
                   if n >= 2 and pairs > 0)

    def lag_weight(self) -> float:
        return sum(pairs for n, pairs in zip(self.n, self.pairs) if n >= 2 and pairs > 0)
