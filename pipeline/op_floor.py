"""The quality stage's op floor: the least time its operations can take on this machine, one
process, from a gradient's and a gradient-plus-HVP's measured cost (`work.step_costs`)."""
from __future__ import annotations


def op_floor(steps: int, costs: list[tuple[float, float]], walked: list[dict], seconds: float,
             cpu_seconds: float) -> dict:
    """The run's op-cost floor: every meta-iteration needs 2T training gradients (the exact and
    the float run) and, per HVP any method took (T each for exact and float reversal, S for each
    DrMAD line, K for truncated reversal, N + 1 for implicit differentiation, 1 for greedy), one
    gradient-plus-HVP. `costs`: `step_costs` timed before and after the run; the floor takes each
    op's faster reading, so a machine whose speed drifts during the run never flatters the ratio
    (both readings' floors are recorded). `walked`: the hypergradient rows of the meta-iterations
    this attempt ran. The floor is one process's: with the exact half in a second process the wall
    time may fall below it, and `cpu_over_floor` (CPU seconds of both) is the work's ratio.
    `hvp_cost_measured`: this machine's gradient-plus-HVP over a gradient, beside the declared
    `quality.hvp_cost` that counted work uses (a stale constant shows here)."""
    meta_iterations = len({r["meta_iteration"] for r in walked})
    reverse_steps = sum(r["hvps"] for r in walked)

    def floor(grad_s: float, hvp_s: float) -> float:
        return meta_iterations * 2 * steps * grad_s + reverse_steps * hvp_s

    grad_s, hvp_s = min(g for g, _ in costs), min(h for _, h in costs)
    best = floor(grad_s, hvp_s)
    return {"floor_time_grad_ms": round(1e3 * grad_s, 4), "floor_time_hvp_ms": round(1e3 * hvp_s, 4),
            "hvp_cost_measured": round(hvp_s / grad_s, 3),
            "floor_time_s": round(best, 1), "floor_time_readings_s": [round(floor(*c), 1) for c in costs],
            "wall_over_floor": round(seconds / best, 3) if best else None,
            "cpu_over_floor": round(cpu_seconds / best, 3) if best else None}
