"""``ssmkit eval forecasting``: SSM forecasters (S4D, Mamba) against ARIMA, ETS, a structural Kalman-filter
model and the naive forecasts, with rolling-origin evaluation on real series bundled with statsmodels.

Series, horizons and origins: :mod:`ssmkit.data.timeseries` and :data:`DATASETS`. Everything fitted sees
only the values before the first origin: each SSM forecaster
(:class:`ssmkit.models.forecaster.SSMForecaster`, quantiles 0.1 / 0.5 / 0.9 by the pinball loss) is trained
on the windows of that part, with its last stretch held out for choosing the checkpoint; ARIMA (order by AIC),
ETS and the Kalman model estimate their parameters there. At every origin each model then forecasts the
next h values from the history up to the origin. Scores over all origins: MASE (scaled by the in-sample
seasonal naive error up to each origin), sMAPE, and the coverage of the 80% interval.

A series may set its own SSM settings (``DATASETS[name]["ssm"]``; sunspots do), chosen with
``--validation``: the series is cut at its first test origin and the same origin layout is laid over what
remains, so that settings are compared without ever reading the test part.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssmkit.classic.structural import StructuralSpec
from ssmkit.data.timeseries import (
    SERIES,
    load_series,
    rolling_origins,
    training_windows,
)
from ssmkit.evals import _forecast_baselines as classic
from ssmkit.evals._common import add_options, resolve_device
from ssmkit.evals._common import settings as experiment_settings
from ssmkit.evals._merge import load as load_part
from ssmkit.evals._report import (
    check_names,
    format_table,
    pyplot,
    save_figure,
    write_result,
)
from ssmkit.evals.registry import register
from ssmkit.models.forecaster import MIXERS, NORMS, ForecasterConfig, SSMForecaster

# Per series: the SSM's history length, the origins, the classical models' fixed choices, and ("ssm") the SSMs'
# settings that differ from the defaults, chosen with --validation (docs/evals.md); options given on the
# command line win over them.
DATASETS: dict[str, dict[str, Any]] = {
    "co2": {"context": 48, "n_origins": 12, "stride": 12, "arima": {"d": 1, "seasonal": (0, 1, 1), "trend": "n"},
            "ets": {"trend": True, "damped": True}, "kalman": StructuralSpec(trend=True, period=12)},
    "sunspots": {"context": 44, "n_origins": 12, "stride": 5, "arima": {"d": 0, "seasonal": None, "trend": "c"},
                 "ets": {"trend": False, "damped": False},
                 "kalman": StructuralSpec(trend=False, period=1, cycle_period=11.0),
                 # No position-in-season feature for a cycle of 9-14 years (see ForecasterConfig).
                 "ssm": {"season_embedding": 0, "transform": "sqrt", "seasonal_skip": True, "zero_head": 1,
                         "ensemble": 3, "steps": 300}},
    "gdp": {"context": 24, "n_origins": 10, "stride": 4, "arima": {"d": 1, "seasonal": None, "trend": "t"},
            "ets": {"trend": True, "damped": True}, "kalman": StructuralSpec(trend=True, period=1),
            # ~150 training windows and a one-seed result that moves by 0.4 MASE with the rounding: 3 seeds
            # (validation S4D 2.158 -> 2.032, Mamba 2.474 -> 2.253; co2 and elnino moved < 0.05, kept at 1).
            "ssm": {"ensemble": 3}},
    "elnino": {"context": 48, "n_origins": 10, "stride": 12, "arima": {"d": 0, "seasonal": (0, 1, 1), "trend": "n"},
               "ets": {"trend": False, "damped": False}, "kalman": StructuralSpec(trend=False, period=12)},
}
TRANSFORMS = ("none", "sqrt")
CLASSICAL = ("arima", "ets", "kalman", "snaive", "naive")
LABELS = {"s4d": "S4D", "mamba": "Mamba", "mamba2": "Mamba-2", "arima": "ARIMA (AIC)", "ets": "ETS",
          "kalman": "Kalman (structural)", "snaive": "seasonal naive", "naive": "naive"}
FULL = {"datasets": list(SERIES), "models": ["s4d", "mamba"], "classical": list(CLASSICAL), "d_model": 32,
        "n_layer": 2, "d_state": 16, "steps": 600, "batch_size": 32, "lr": 3e-3, "weight_decay": 0.01,
        "val_fraction": 0.15, "arima_max_p": 3, "arima_max_q": 2, "kalman_iterations": 50, "seed": 0,
        "ensemble": 1, "norm": "last", "transform": "none", "context": 0, "zero_head": 0,
        "season_embedding": 1}
SMOKE = {**FULL, "datasets": ["gdp"], "models": ["s4d", "mamba"], "d_model": 16, "n_layer": 1, "d_state": 8,
         "steps": 20, "arima_max_p": 1, "arima_max_q": 0, "kalman_iterations": 2}
HELP = {
    "datasets": f"series, from {', '.join(SERIES)}", "models": f"SSM forecasters, from {', '.join(MIXERS)}",
    "classical": f"classical forecasters, from {', '.join(CLASSICAL)}", "d_model": "SSM width",
    "n_layer": "SSM blocks", "d_state": "SSM state size", "steps": "training steps per series and model",
    "batch_size": "windows per step", "lr": "peak AdamW learning rate (warm-up, cosine to 0)",
    "weight_decay": "AdamW weight decay", "val_fraction": "last share of the pre-origin part held out to pick "
    "the checkpoint", "arima_max_p": "largest AR order tried", "arima_max_q": "largest MA order tried",
    "kalman_iterations": "L-BFGS iterations of the Kalman model's likelihood fit", "seed": "seed of the SSMs",
    "ensemble": "SSM forecasters trained per series and model (seeds seed, seed+1, ...); their quantiles averaged",
    "norm": f"where each SSM history is centred, from {', '.join(NORMS)}",
    "zero_head": "1: the SSMs' head starts at zero (the untrained forecast is the location, or the seasonal naive "
    "forecast with --seasonal-skip)",
    "season_embedding": "1: the SSMs embed each step's position in the season (0: not, for a cycle that is no "
    "calendar season)",
    "transform": f"what the SSMs model, from {', '.join(TRANSFORMS)} (sqrt: the square root of a series >= 0; "
    "the quantiles are squared back, exactly)", "context": "SSM history length (0: the series' own, see DATASETS)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, FULL, SMOKE, HELP)
    parser.add_argument("--seasonal-skip", action=argparse.BooleanOptionalAction, default=None,
                        help="the SSMs predict the correction to the seasonal naive forecast (default: off, but see "
                        "the series' own settings in DATASETS)")
    parser.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                        help="combine finished runs of other series (their --out folders; the same settings but "
                        "--datasets) into one table, fan plot and result.json in --out; nothing is trained")
    parser.add_argument("--validation", action="store_true",
                        help="score on origins carved from the part before the first test origin only (for choosing "
                        "settings): each series is cut there and the same origin layout laid over what remains")


def run(args: argparse.Namespace, out_dir: Any) -> dict[str, Any]:
    """Forecast every series with every model; print the table, write result.json and forecast_fans.png."""
    if getattr(args, "merge", None):
        return merge(args.merge, Path(out_dir))
    settings = {**experiment_settings(args, FULL, SMOKE), "seasonal_skip": bool(getattr(args, "seasonal_skip", None)),
                "validation": bool(getattr(args, "validation", False))}
    datasets = check_names(settings["datasets"], SERIES, "--datasets")
    models = check_names(settings["models"], MIXERS, "--models") if settings["models"] else []
    classical = check_names(settings["classical"], CLASSICAL, "--classical")
    for name in ("d_model", "n_layer", "d_state", "steps", "batch_size", "kalman_iterations", "ensemble"):
        if settings[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    check_names([settings["norm"]], NORMS, "--norm")
    check_names([settings["transform"]], TRANSFORMS, "--transform")
    if settings["context"] < 0:
        raise ValueError(f"--context must be >= 0, got {settings['context']}")
    if not 0 < settings["val_fraction"] < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {settings['val_fraction']}")
    device, out = resolve_device(args.device), Path(out_dir)
    given = given_options(args)
    results = {}
    for name in datasets:
        series, spec = load_series(name), DATASETS[name]
        origins = rolling_origins(len(series.values), series.horizon, spec["n_origins"], spec["stride"])
        if settings["validation"]:  # the test part is never seen: cut before it, the same layout again
            series = dataclasses.replace(series, values=series.values[:origins[0]])
            origins = rolling_origins(len(series.values), series.horizon, spec["n_origins"], spec["stride"])
        spec = {**spec, "context": settings["context"] or spec["context"]}
        recipe = series_settings(name, given)
        values, h, m = series.values, series.horizon, series.period
        actual = np.stack([values[o:o + h] for o in origins])
        print(f"== {name}: {series.source}; {len(values)} steps, period {m}, horizon {h}, origins "
              f"{origins[0]}..{origins[-1]} every {spec['stride']}", flush=True)
        entries = {}
        for model in [*models, *classical]:
            start = time.perf_counter()
            forecast = _forecast(model, series, spec, origins, {**settings, **recipe}, device)
            seconds = time.perf_counter() - start
            entries[model] = _score(forecast, actual, values, origins, m, seconds)
            print(f"{LABELS[model]}: MASE {entries[model]['mase']:.3f}, sMAPE {entries[model]['smape']:.2f}% "
                  f"({seconds:.1f} s)", flush=True)
        results[name] = {"source": series.source, "unit": series.unit, "length": len(values), "period": m,
                         "horizon": h, "context": spec["context"], "ssm_settings": recipe, "origins": origins,
                         "stride": spec["stride"],
                         "start": series.start, "step": series.step, "values": values.tolist(),
                         "models": entries}
    result = {"task": "forecasting", "smoke": bool(args.smoke), "device": str(device), "torch": torch.__version__,
              "settings": settings, "datasets": results}
    print(report(result, out))
    write_result(out, result)
    return result


def given_options(args: argparse.Namespace) -> set[str]:
    """The settings given on the command line (they win over a series' own SSM settings)."""
    given = {k for k in FULL if getattr(args, k, None) is not None}
    if getattr(args, "seasonal_skip", None) is not None:
        given.add("seasonal_skip")
    return given


def series_settings(name: str, given: set[str]) -> dict[str, Any]:
    """The SSM settings of series ``name`` that replace the defaults (``DATASETS[name]["ssm"]``), less those
    in ``given``."""
    return {k: v for k, v in DATASETS[name].get("ssm", {}).items() if k not in given}


def merge(folders: list[str], out_dir: Path) -> dict[str, Any]:
    """One result of runs made apart, one or more series each (e.g. a process per series): their settings
    must agree but for ``datasets``, and no series may be in two of them."""
    parts = [load_part("forecasting", Path(folder), "datasets") for folder in folders]
    first, datasets = parts[0], {}
    same = lambda part: ({k: v for k, v in part["settings"].items() if k != "datasets"}, part["smoke"])
    for part, folder in zip(parts, folders):
        if same(part) != same(first):
            raise ValueError(f"--merge: {folder} was run with other settings than {folders[0]}; only --datasets "
                             "may differ")
        for name, entry in part["datasets"].items():
            if name in datasets:
                raise ValueError(f"--merge: series {name!r} is in more than one of the merged runs")
            datasets[name] = entry
    result = {**first, "settings": {**first["settings"], "datasets": list(datasets)}, "datasets": datasets,
              "merged_from": [str(folder) for folder in folders]}
    print(report(result, out_dir))
    write_result(out_dir, result)
    return result


def _forecast(model: str, series: Any, spec: dict[str, Any], origins: list[int], settings: dict[str, Any],
              device: torch.device) -> dict[str, Any]:
    values, h, m = series.values, series.horizon, series.period
    if model == "naive":
        return classic.seasonal_naive(values, origins, h, 1)
    if model == "snaive":
        return classic.seasonal_naive(values, origins, h, m)
    if model == "arima":
        return classic.arima(values, origins, h, period=m, max_p=settings["arima_max_p"],
                             max_q=settings["arima_max_q"], **spec["arima"])
    if model == "ets":
        return classic.ets(values, origins, h, period=m, **spec["ets"])
    if model == "kalman":
        return classic.kalman(values, origins, h, spec["kalman"], settings["kalman_iterations"])
    return ssm_forecast(model, values, origins, h, m, spec["context"], settings, device)


def _score(forecast: dict[str, Any], actual: np.ndarray, values: np.ndarray, origins: list[int], period: int,
           seconds: float) -> dict[str, Any]:
    point = forecast["point"]
    entry = {"mase": classic.mase(actual, point, values, origins, period), "smape": classic.smape(actual, point),
             "coverage80": None, "seconds": seconds, "point": point.tolist(), "lower": None, "upper": None,
             "details": forecast.get("details", {})}
    if forecast["lower"] is not None:
        entry.update(coverage80=classic.coverage(actual, forecast["lower"], forecast["upper"]),
                     lower=forecast["lower"].tolist(), upper=forecast["upper"].tolist())
    return entry


def ssm_forecast(mixer: str, values: np.ndarray, origins: list[int], horizon: int, period: int, context: int,
                 settings: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Train ``settings["ensemble"]`` :class:`SSMForecaster` s (seeds ``seed``, ``seed + 1``, ...) on the windows
    before ``origins[0]`` (the last ``val_fraction`` of that part held out: each keeps the checkpoint with the
    lowest held-out pinball loss), then forecast from every origin: the members' quantiles averaged. With
    ``transform="sqrt"`` the models see the square root of the series and the quantiles are squared back
    (a monotone map carries quantiles over exactly)."""
    transform = settings.get("transform", "none")
    if transform == "sqrt":
        if (values < 0).any():
            raise ValueError("--transform sqrt needs a series without negative values")
        values = np.sqrt(values)
    first = origins[0]
    cut = first - max(horizon, round(settings["val_fraction"] * first))
    train_x, train_y = training_windows(values, context, horizon, cut)
    # Held-out windows: targets inside [cut, first), inputs may reach back before the cut.
    val_starts = np.arange(cut - context, first - context - horizon + 1)
    val_x = values[val_starts[:, None] + np.arange(context)]
    val_y = values[val_starts[:, None] + context + np.arange(horizon)]
    as_tensor = lambda a: torch.tensor(a, dtype=torch.float32, device=device)
    train = (as_tensor(train_x), as_tensor(train_y), torch.arange(len(train_x), device=device) % period)
    held_out = (as_tensor(val_x), as_tensor(val_y), torch.from_numpy(val_starts % period).to(device))
    config = ForecasterConfig(mixer=mixer, horizon=horizon, period=period, d_model=settings["d_model"],
                              n_layer=settings["n_layer"], d_state=settings["d_state"],
                              seasonal_skip=settings.get("seasonal_skip", False), norm=settings.get("norm", "last"),
                              zero_head=bool(settings.get("zero_head", 0)),
                              season_embedding=bool(settings.get("season_embedding", 1)))
    history = as_tensor(np.stack([values[o - context:o] for o in origins]))
    phase = torch.tensor([(o - context) % period for o in origins], device=device)
    members, best, best_steps = [], [], []
    for k in range(settings.get("ensemble", 1)):
        model, loss, step = _train_forecaster(config, train, held_out, settings, settings["seed"] + k, device)
        with torch.no_grad():
            members.append(model(history, phase).cpu().double())
        best.append(loss)
        best_steps.append(step)
    quantiles = torch.stack(members).mean(0).sort(dim=-1).values.numpy()
    if transform == "sqrt":
        quantiles = np.square(np.maximum(quantiles, 0.0))
    mid, low, high = config.quantiles.index(0.5), 0, len(config.quantiles) - 1
    return {"point": quantiles[..., mid], "lower": quantiles[..., low], "upper": quantiles[..., high],
            "details": {"config": config.to_dict(), "params": sum(p.numel() for p in model.parameters()),
                        "members": len(members), "transform": transform, "train_windows": len(train_x),
                        "val_windows": len(val_x), "best_val_pinball": best, "best_step": best_steps}}


def _train_forecaster(config: ForecasterConfig, train: tuple[torch.Tensor, ...], held_out: tuple[torch.Tensor, ...],
                      settings: dict[str, Any], seed: int, device: torch.device) -> tuple[SSMForecaster, float, int]:
    """AdamW with warm-up and cosine on random batches of ``train`` (inputs, targets, phases); the weights with the
    lowest pinball loss on ``held_out`` (checked at the start and 40 times) are returned, in eval mode, with
    that loss and the step they are from."""
    torch.manual_seed(seed)
    model = SSMForecaster(config).to(device)
    steps = settings["steps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    generator = torch.Generator().manual_seed(seed)
    best, best_state, best_step, check_every = math.inf, None, 0, max(1, steps // 40)
    for step in range(steps + 1):
        if step > 0:
            model.train()
            rows = torch.randint(0, len(train[0]), (settings["batch_size"],), generator=generator).to(device)
            loss = model.loss(*(t[rows] for t in train))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        if step % check_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                val = float(model.loss(*held_out))
            if val < best:
                best, best_state, best_step = val, copy.deepcopy(model.state_dict()), step
    model.load_state_dict(best_state)
    return model.eval(), best, best_step


def report(result: dict[str, Any], out_dir: Path) -> str:
    """Set ``result["table"]`` (MASE, sMAPE, coverage per series and model) and ``result["plots"]``."""
    rows = []
    for name, data in result["datasets"].items():
        best = min(e["mase"] for e in data["models"].values())
        for model, e in data["models"].items():
            mark = " *" if e["mase"] == best else ""
            rows.append([name, LABELS[model] + mark, e["mase"], e["smape"], e["coverage80"], e["seconds"]])
    result["table"] = format_table(["series", "model (* best MASE)", "MASE", "sMAPE %", "80% coverage", "s"], rows)
    plot = _fan_plot(result, Path(out_dir) / "forecast_fans.png")
    result["plots"] = [plot.name]
    return result["table"]


def _fan_plot(result: dict[str, Any], path: Path) -> Path:
    """Per series: the values around the test part, and for three origins the first SSM's median and 80% fan
    with ARIMA's median."""
    plt = pyplot()
    names = list(result["datasets"])
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        data = result["datasets"][name]
        origins, h = data["origins"], data["horizon"]
        time_axis = data["start"] + data["step"] * np.arange(data["length"])
        begin = max(0, origins[0] - 3 * data["stride"])
        ax.plot(time_axis[begin:], data["values"][begin:], color="black", lw=1.0, label="actual")
        fan = next((m for m in data["models"] if m in MIXERS), None)
        shown = sorted({0, len(origins) // 2, len(origins) - 1})
        for i in shown:
            steps = time_axis[origins[i]:origins[i] + h]
            if fan is not None:
                e = data["models"][fan]
                ax.fill_between(steps, e["lower"][i], e["upper"][i], color="tab:blue", alpha=0.25,
                                label=f"{LABELS[fan]} 10-90%" if i == shown[0] else None)
                ax.plot(steps, e["point"][i], color="tab:blue", lw=1.5,
                        label=f"{LABELS[fan]} median" if i == shown[0] else None)
            if "arima" in data["models"]:
                ax.plot(steps, data["models"]["arima"]["point"][i], color="tab:red", lw=1.0, ls="--",
                        label="ARIMA" if i == shown[0] else None)
            ax.axvline(time_axis[origins[i]], color="gray", lw=0.5, ls=":")
        ax.set(title=f"{name} ({data['unit']})", xlabel="year")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    return save_figure(fig, path)


ENTRY = register("eval", "forecasting", "time-series forecasting with S4D and Mamba against ARIMA, ETS, a Kalman "
                 "structural model and naive forecasts, rolling origins on statsmodels' bundled series",
                 add_arguments, run)
