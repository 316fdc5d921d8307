"""Plot a budget file: kept fraction per layer x KV head, and retained mass.

    python examples/plot_budgets.py [budgets.json] [--out budgets.png]

Without a file, plots the shipped SmolLM2 budgets. Needs matplotlib
(``pip install -e '.[examples]'`` in the repository).
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from tca_flex import HeadBudgets, shipped_budgets  # noqa: E402


def plot(budgets: HeadBudgets, out: str) -> None:
    kept = budgets.keep_fraction().numpy()  # [layers, kv_heads]
    fig, (ax_map, ax_hist) = plt.subplots(1, 2, figsize=(11, 6), gridspec_kw={"width_ratios": [1, 1.3]})
    image = ax_map.imshow(kept, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax_map.set_xlabel("KV head")
    ax_map.set_ylabel("layer")
    ax_map.set_xticks(range(budgets.num_kv_heads))
    ax_map.set_title("expected kept fraction per block")
    if budgets.candidate is not None:  # mark heads that stayed dense
        for layer, head in (budgets.candidate == -1).nonzero().tolist():
            ax_map.text(head, layer, "D", ha="center", va="center", color="black", fontsize=8)
    fig.colorbar(image, ax=ax_map, fraction=0.05)
    if budgets.retained_mass is not None:
        mass = budgets.retained_mass.flatten()
        ax_hist.hist(mass[~mass.isnan()].numpy(), bins=30, color="tab:blue")
        tau = budgets.config.tau
        ax_hist.axvline(tau, color="tab:red", linestyle="--", label=f"tau = {tau}")
        ax_hist.legend()
    quantile = budgets.config.mass_quantile
    measure = budgets.config.mass_criterion + ("" if quantile is None else f", {quantile:g} quantile")
    ax_hist.set_xlabel(f"retained mass ({measure})")
    ax_hist.set_ylabel("heads")
    ax_hist.set_title("retained attention mass on the calibration text")
    name = budgets.fingerprint.get("name_or_path") or budgets.fingerprint.get("model_type", "model")
    fig.suptitle(f"{name}: block {budgets.config.block_size}, window {budgets.config.window}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("budgets", nargs="?", help="budget file (default: shipped SmolLM2 budgets)")
    parser.add_argument("--out", default="budgets.png", help="PNG to write")
    args = parser.parse_args()
    try:
        budgets = HeadBudgets.load(args.budgets) if args.budgets else shipped_budgets("smollm2")
    except (OSError, ValueError) as err:
        parser.error(f"argument budgets: {err}")
    plot(budgets, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
