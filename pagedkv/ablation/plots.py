"""Plots of the preemption ablation (matplotlib, headless), in the style of the vLLM paper's Fig. 19."""
from __future__ import annotations

from pathlib import Path

MODE_STYLE = {"swap": dict(color="tab:blue", marker="o"), "recompute": dict(color="tab:orange", marker="s"),
              "auto": dict(color="tab:green", marker="^", linestyle="--")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_micro(rows, path: Path, device: str) -> None:
    """Fig. 19a: time vs block size, swap (out + in) solid, recompute dashed, one colour per context."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    contexts = sorted({r.context for r in rows})
    colors = plt.get_cmap("viridis")(
        [i / max(len(contexts) - 1, 1) * 0.85 for i in range(len(contexts))])
    for context, color in zip(contexts, colors):
        pts = sorted((r for r in rows if r.context == context), key=lambda r: r.block_size)
        sizes = [r.block_size for r in pts]
        ax.plot(sizes, [r.swap_s * 1e3 for r in pts], marker="o", color=color, label=f"swap, {context} tokens")
        ax.plot(sizes, [r.recompute_s * 1e3 for r in pts], marker="s", linestyle="--", color=color,
                label=f"recompute, {context} tokens")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({r.block_size for r in rows})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("block size (tokens)")
    ax.set_ylabel("time (ms)")
    ax.set_title(f"Swap out + in vs recompute, per context ({device})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: lines fill the plot
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_e2e(rows, path: Path, device: str) -> None:
    """Fig. 19b: normalized latency (mean, and p99) vs request rate, one line per mode."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rates = sorted({r.rate for r in rows})
    finite = [r for r in rates if r != float("inf")]
    # An infinite rate (everything at once) is drawn one step right of the largest finite one.
    x_of = {r: (r if r != float("inf") else (max(finite) * 2 if finite else 1.0)) for r in rates}
    for ax, attr, title in ((axes[0], "mean_norm_latency", "mean"), (axes[1], "p99_norm_latency", "p99")):
        for mode, style in MODE_STYLE.items():
            pts = sorted((r for r in rows if r.mode == mode), key=lambda r: r.rate)
            if pts:
                ax.plot([x_of[r.rate] for r in pts], [getattr(r, attr) * 1e3 for r in pts], label=mode, **style)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("normalized latency (ms/token)")
        ax.set_title(f"{title} normalized latency ({device})")
        if all(x > 0 for x in x_of.values()):
            ax.set_xscale("log", base=2)
        ax.set_xticks([x_of[r] for r in rates], ["all at once" if r == float("inf") else f"{r:g}" for r in rates])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PAPER_SAVED = {"parallel": (0.06, 0.30), "beam": (0.37, 0.66)}  # vLLM paper, Figs. 15 and 16


def paper_kind(kind: str) -> str:
    """"beam" for beam search rows, "parallel" for parallel sampling, whatever the exact label."""
    return "beam" if "beam" in kind.lower() else "parallel"


def plot_memory(rows, path: Path) -> None:
    """Memory saved by sharing per width, with the paper's range behind each kind."""
    plt = _pyplot()
    kinds = list(dict.fromkeys(r.kind for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        pts = sorted((r for r in rows if r.kind == kind), key=lambda r: r.width)
        low, high = PAPER_SAVED[paper_kind(kind)]
        ax.axhspan(low * 100, high * 100, color="grey", alpha=0.2, label="vLLM paper")
        ax.bar([str(r.width) for r in pts], [r.memory_saved * 100 for r in pts], color="tab:blue", label="measured")
        beam = paper_kind(kind) == "beam"
        ax.set_xlabel("beam width" if beam else "parallel samples n")
        ax.set_ylabel("memory saved by sharing (%)")
        ax.set_title("beam search" if beam else "parallel sampling")
        ax.set_ylim(0, 100)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
