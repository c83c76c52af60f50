import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from layer_probe.errors import LayerProbeError
from layer_probe.dynamics import History
from layer_probe.plots import plot_dynamics, plot_responses, plot_rise, save_figure


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg"])
def test_fig7_plot_formats(responses, tmp_path, suffix):  # noqa: F811
    path = save_figure(plot_responses([responses]), tmp_path / f"fig7{suffix}")
    head = path.read_bytes()[:16]
    assert {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}[suffix] in head


@pytest.mark.parametrize("suffix", [".pdf", ".svg"])
def test_vector_output_is_deterministic(responses, tmp_path, suffix):  # noqa: F811
    a = save_figure(plot_responses([responses], style="paper"), tmp_path / f"a{suffix}").read_bytes()
    b = save_figure(plot_responses([responses], style="paper"), tmp_path / f"b{suffix}").read_bytes()
    assert a == b


def test_unknown_format(responses, tmp_path):  # noqa: F811
    with pytest.raises(LayerProbeError, match="png, .pdf or .svg|.png, .pdf, .svg"):
        save_figure(plot_responses([responses]), tmp_path / "fig.jpg")


def test_dynamics_never_shows_eval_mode_at_initialisation():
    rng = np.random.default_rng(0)
    frames = []
    for label in ("plain8", "resnet8"):
        stds = {(0, "eval"): np.full(7, 1e6), (0, "train"): np.ones(7)}  # epoch 0 in eval mode: raw conv outputs
        stds.update({(e, m): rng.uniform(0.5, 2.0, 7) for e in (1, 2, 3) for m in ("eval", "train")})
        rows = [{"epoch": e, "bn_mode": m, "index": i + 1, "name": f"layer1.{i}.bn2", "role": "branch_out", "std": v,
                 "ratio": 0.5, "stage": 1, "block": i} for (e, m), values in stds.items() for i, v in enumerate(values)]
        frames.append((label, pd.DataFrame(rows)))
    fig = plot_dynamics([History(label, frame) for label, frame in frames])
    shown = np.concatenate([f.loc[((f.epoch >= 1) & (f.bn_mode == "eval")) | ((f.epoch == 0) & (f.bn_mode == "train")),
                                  "std"].to_numpy() for _, f in frames])
    norm = fig.axes[0].collections[0].norm
    assert np.asarray(fig.axes[0].collections[0].get_array()).max() < 1e6
    assert (norm.vmin, norm.vmax) == pytest.approx(tuple(np.percentile(shown, [1, 99])))


def test_fig7_draws_each_models_std_in_network_order_and_sorted(responses):  # noqa: F811
    fig = plot_responses([responses])
    top, bottom = fig.axes[:2]
    (line,), (sorted_line,) = top.get_lines(), bottom.get_lines()
    assert line.get_xdata().tolist() == list(range(1, len(responses) + 1))
    assert line.get_ydata().tolist() == responses.std()
    assert sorted_line.get_ydata().tolist() == sorted(responses.std(), reverse=True)
    assert line.get_linestyle() == "-" and line.get_label() == responses.label  # a ResNet: solid


def test_panels_compose_into_the_callers_figure(responses):  # noqa: F811
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2)
    assert plot_responses([responses], axes=axes[:, 1]) is fig
    assert axes[0, 0].get_lines() == [] and axes[0, 1].get_lines()[0].get_ydata().tolist() == responses.std()
    assert len(fig.axes) == 4  # nothing added
    plt.close(fig)


def test_seed_replicates_are_drawn_as_their_mean_with_a_band(responses):  # noqa: F811
    from dataclasses import replace

    from layer_probe.results import Responses

    shifted = Responses(tuple(replace(s, std=s.std + 0.5) for s in responses.sites), responses.blocks,
                        responses.meta | {"label": "r-seed1", "group": "r"})
    base = Responses(responses.sites, responses.blocks, responses.meta | {"label": "r", "group": "r"})
    top = plot_responses([base, shifted]).axes[0]
    (line,) = top.get_lines()
    assert line.get_ydata().tolist() == pytest.approx([s + 0.25 for s in responses.std()])
    assert line.get_label() == "r (2 seeds)" and len(top.collections) == 1  # the min-max band


def test_rise_draws_each_run_during_training_and_both_bn_modes_at_the_end():
    during = pd.DataFrame({"resnet20": [1.0, 1.2, 1.7], "plain20": [1.0, 0.9, 1.2]})
    end = pd.DataFrame({"rise": [1.7, 1.2], "rise_batch": [1.5, 1.1]}, index=["resnet20", "plain20"])
    fig = plot_rise(during, {"trained": end})
    left, right = fig.axes
    assert [line.get_ydata().tolist() for line in left.get_lines()[:2]] == [[1.0, 1.2, 1.7], [1.0, 0.9, 1.2]]
    running, batch = right.get_lines()[:2]
    assert running.get_xdata().tolist() == [1.7, 1.2] and batch.get_xdata().tolist() == [1.5, 1.1]
    assert [t.get_text() for t in right.get_yticklabels()] == ["resnet20", "plain20"] and right.get_title() == "trained"
    plt.close(fig)
