"""The training run's plot (``metrics.png``): reward, KL and step time per step."""
from __future__ import annotations


def write_plot(history: list, path: str) -> str | None:
    """Reward, KL and step time per step as a PNG; None (after saying why) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, title in zip(axes, ("reward", "kl", "step_time"), ("mean reward", "KL to reference", "step time (s)")):
        ax.plot(steps, [r[key] for r in history])
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
