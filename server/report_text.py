"""``model build`` and ``model report`` as text: the variants table of one profile and its notes."""

from __future__ import annotations

from server.compression import ProfileReport, VariantReport, is_experiment
from server.load_errors import CONFIRMATIONS, by_pair
from server.render import cell, human_bytes, table


def ops_section(report: ProfileReport) -> str:
    """``model report --ops``: what the converter made of each variant."""
    from server.compress.graph import describe_graph

    lines = ["", "graphs (operators; XNNPACK coverage; Keras layers each fused operator holds):"]
    for v in report.variants:
        graph = v.details.get("graph")
        if not graph:
            continue
        if "error" in graph:
            lines.append(f"  {v.recipe}: {graph['error']}")
            continue
        described = describe_graph(graph, v.details.get("undelegated_ops"), v.details.get("delegate_partitions"))
        lines.append(f"  {v.recipe}: {described[0]}")
        lines += [f"    {line}" for line in described[1:]]
    return "\n".join(lines)


def report_table(report: ProfileReport) -> str:
    float32 = next((v for v in report.variants if v.recipe == "float32" and v.size_bytes), None)
    base = float32.size_bytes if float32 else None
    base_p50 = float32.p50_ms if float32 else None

    def ratio(value: float | None, reference: float | None) -> str:
        return f"{value / reference:.2f}x" if value and reference else "-"

    rows = [
        [
            ("* " if v.chosen else "  ") + v.recipe + (" [experiment]" if is_experiment(v) else ""),
            params_cell(v.details.get("params")), cell(v.size_bytes), ratio(v.size_bytes, base), cell(v.gzip_bytes),
            cell(v.accuracy, ".4f"),
            f"{v.accuracy - report.reference_accuracy:+.4f}" if v.accuracy is not None else "-",
            cell(v.p50_ms, ".4f"), ratio(v.p50_ms, base_p50), cell(v.p95_ms, ".4f"), human_bytes(v.peak_rss_bytes),
            measured_where(v), v.verdict, " ".join((v.reason or str(v.details.get("encoding", ""))).split()),
        ]
        for v in report.variants
    ]
    header = (f"{report.model}:{report.version} for {report.profile} (objective {report.objective}, budget "
              f"{report.accuracy_budget:g} below float32 accuracy {report.reference_accuracy:.4f}); * = chosen (ships)")
    if any(is_experiment(v) for v in report.variants):
        header += "\n[experiment] = built with 'model build --recipe', not the profile's own recipe: shipped only with --ship"
    if not report.eval_labelled:
        header += "\n(the eval set has no labels: ACCURACY is top-1 agreement with the float model)"
    return header + "\n" + table(
        ["RECIPE", "PARAMS", "BYTES", "VS F32", "GZIP", "ACCURACY", "DELTA", "P50 MS", "VS F32", "P95 MS", "RSS",
         "MEASURED", "VERDICT", "WHY"], rows,
    ) + units_notes(report) + device_notes(report) + load_errors_table(report)


def measured_where(v: VariantReport) -> str:
    """Where the row's accuracy, latency and RSS come from: the host, or the devices of --measure-on."""
    devices = v.details.get("measured_on", {}).get("devices") or []
    return "on " + ",".join(devices) if devices else "host"


def device_notes(report: ProfileReport) -> str:
    """For the variants timed on devices (``model build --measure-on``): the host's numbers beside them, and the
    devices that did not answer."""
    lines = []
    for v in report.variants:
        where, host = v.details.get("measured_on"), v.details.get("host")
        if where and host:
            lines.append(f"{v.recipe}: on {', '.join(where['devices'])} ({where.get('runtime')}, "
                         f"{where.get('threads')} threads); on the host p50 {cell(host.get('p50_ms'), '.4f')} ms, "
                         f"p95 {cell(host.get('p95_ms'), '.4f')} ms, accuracy {cell(host.get('accuracy'), '.4f')}")
        elif where and where.get("unanswered"):
            lines.append(f"{v.recipe}: {', '.join(where['unanswered'])} did not answer in time: host numbers")
    return "\nmeasured on devices (ACCURACY on the eval slice they hold):\n" + "\n".join(lines) if lines else ""


def params_cell(params: int | None) -> str:
    return "-" if params is None else f"{params / 1000:.1f}k"


def units_notes(report: ProfileReport) -> str:
    """For each neuron/filter-pruned variant: the units each layer kept, and the layers left whole and why."""
    lines = []
    for v in report.variants:
        if "units" in v.details:
            kept = ", ".join(f"{layer} {units}" for layer, units in v.details["units"].items())
            whole = "; ".join(f"{layer} ({why})" for layer, why in v.details.get("untouched", {}).items())
            lines.append(f"{v.recipe}: units kept {kept}" + (f"; left whole: {whole}" if whole else ""))
    return "\n" + "\n".join(lines) if lines else ""


def load_errors_table(report: ProfileReport) -> str:
    """Who reported that their runtime could not load a variant; empty when nobody did."""
    known = by_pair(report.load_errors)
    rows = [
        [v.recipe, e.runtime, "confirmed" if known[e.model_sha256, e.runtime].confirmed else "unconfirmed", e.device,
         cell(e.deployment_id), e.reported_at.strftime("%Y-%m-%d %H:%MZ"), e.reason]
        for v in report.variants for e in report.load_errors_of(v)
    ]
    if not rows:
        return ""
    return (f"\n\nload errors reported by devices (a runtime with {CONFIRMATIONS}+ reports is refused at rollout "
            "unless --ignore-load-errors):\n"
            + table(["RECIPE", "RUNTIME", "STATUS", "DEVICE", "DEPLOYMENT", "REPORTED", "REASON"], rows))
