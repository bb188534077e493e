"""
The bench's report: one Markdown table (each capsule figure, its floor, the
ratio, the target, the verdict) and the notes under it.  Pure: it formats
the results a run gathered, and measures nothing.
"""

from __future__ import annotations

import json
import os

from cpuwatch import describe as describe_cpu, path_ms_per_mb
from density import density_table
from floors import CPUS, MEMORY, PIDS, THREADS
from measures import KEY_GAP, ms
from pagetrace import describe as describe_trace

# Targets (see the table).
TARGET_WARM_MEDIAN = 0.5
TARGET_WARM_P90 = 1.0
TARGET_COLD = 1.15
TARGET_REFILL_ECHO = 1.5
TARGET_PAGE_WARM_RETURNING_MS = 150
TARGET_PAGE_WARM_FIRST_MS = 250
TARGET_BINARY = 1.5  # issue 21: 1.5x the raw exec stream (`docker exec -it`)
TARGET_JSON = 0.50
TARGET_ECHO_P50_MS = 1.0
TARGET_ECHO_P99_MS = 2.0
TARGET_RSS_PER_SESSION_MB = 1.0
TARGET_FLOOD_MB = 20.0
TARGET_GONE_AFTER_GRACE_S = 2.0


def table(r: dict, f: dict, p: dict) -> str:
    """
    The Markdown table: each figure, its floor, the ratio, the target and
    the verdict; a figure that failed says why.

    @param r: the results; @param f: the failures (phase -> message);
    @param p: the run's sizes.
    """
    rows = []

    def verdict(ok: bool | None) -> str:
        return "—" if ok is None else ("ok" if ok else "**missed**")

    def failed(*names: str) -> str | None:
        for name in names:
            if name in f:
                return f"failed: {f[name][:120]}"
        return None

    def connect_fmt(s):
        return (f"median {s['median']:.0f} (min {s['min']:.0f}, p90 {s['p90']:.0f};"
                f" n={s['n']})")

    def connect_row(title, key, floor_key, floor_name, target, phases):
        value, floor = r.get(key), r.get(floor_key)
        if value and floor:
            ratio = value["median"] / floor["median"]
            rows.append([title, connect_fmt(value), f"{floor_name}: {connect_fmt(floor)}",
                         f"{ratio:.2f}x", f"≤ {target}x", verdict(ratio <= target)])
        else:
            rows.append([title, connect_fmt(value) if value else (failed(*phases) or "n/a"),
                         connect_fmt(floor) if floor else (failed(*phases) or "n/a"),
                         "—", f"≤ {target}x", "—"])

    warm, floor_exec = r.get("warm"), r.get("floor_exec")
    title = "connect → usable shell, warm (pool 2), ms"
    target = f"median ≤ {TARGET_WARM_MEDIAN:g}x, p90 ≤ {TARGET_WARM_P90:g}x"
    if warm and floor_exec:
        median = warm["median"] / floor_exec["median"]
        p90 = warm["p90"] / floor_exec["p90"]
        rows.append([title, connect_fmt(warm), f"plain exec: {connect_fmt(floor_exec)}",
                     f"median {median:.2f}x, p90 {p90:.2f}x", target,
                     verdict(median <= TARGET_WARM_MEDIAN and p90 <= TARGET_WARM_P90)])
    else:
        reason = failed("connect, warm", "capsule (warm)") or "n/a"
        rows.append([title, connect_fmt(warm) if warm else reason,
                     connect_fmt(floor_exec) if floor_exec else reason, "—", target, "—"])
    connect_row("connect → usable shell, cold (pool 0), ms", "cold", "floor_cold",
                "create+start+exec", TARGET_COLD,
                ("connect, cold", "capsule (cold)"))

    floor_echo = r.get("floor_echo")
    for name in ("binary", "json"):
        value = r.get(f"echo_{name}")
        title = f"keystroke echo, {name.upper() if name == 'json' else name} protocol, ms"
        floor_text = (f"raw exec: p50 {floor_echo['p50']:.2f} / p99 {floor_echo['p99']:.2f}"
                      if floor_echo else (failed("echo", "capsule (warm)") or "n/a"))
        if value:
            ratio = (f"{value['p50'] / floor_echo['p50']:.1f}x / "
                     f"{value['p99'] / floor_echo['p99']:.1f}x" if floor_echo else "—")
            ok = value["p50"] <= TARGET_ECHO_P50_MS and value["p99"] <= TARGET_ECHO_P99_MS
            rows.append([title, f"p50 {value['p50']:.2f} / p99 {value['p99']:.2f}"
                         f" (max {value['max']:.1f}; n={value['n']})", floor_text, ratio,
                         f"p50 ≤ {TARGET_ECHO_P50_MS:g}, p99 ≤ {TARGET_ECHO_P99_MS:g} ms",
                         verdict(ok)])
        else:
            rows.append([title, failed("echo", "capsule (warm)") or "n/a",
                         floor_text, "—", "p50 ≤ 1, p99 ≤ 2 ms", "—"])

    quiet, busy = r.get("echo_quiet"), r.get("echo_refill")
    target = f"p99 ≤ {TARGET_REFILL_ECHO:g}x quiet"
    if quiet and busy:
        title = (f"keystroke echo while the pool refills ({busy['takes']} sessions taken"
                 f" one after another, binary), ms")
        ratio = busy["p99"] / quiet["p99"]
        rows.append([title, f"p50 {busy['p50']:.2f} / p99 {busy['p99']:.2f}"
                     f" (max {busy['max']:.1f}; n={busy['n']})",
                     f"the same, quiet: p50 {quiet['p50']:.2f} / p99 {quiet['p99']:.2f}"
                     f" (max {quiet['max']:.1f})",
                     f"p99 {ratio:.2f}x", target, verdict(ratio <= TARGET_REFILL_ECHO)])
    else:
        rows.append(["keystroke echo while the pool refills, ms",
                     failed("refill: echo while the pool refills", "capsule (warm)") or "n/a",
                     "—", "—", target, "—"])

    def tp_fmt(value):
        return (f"median {value['median']:.1f}, best {value['best']:.1f}"
                f" (n={len(value['all'])}, {value['bytes'] / 1e6:.0f} MB each)")

    floor_tp = r.get("floor_throughput")
    floor_tp_text = (f"raw exec stream: {tp_fmt(floor_tp)}"
                     if floor_tp else (failed("throughput", "capsule (warm)") or "n/a"))
    for name, target in (("binary", TARGET_BINARY), ("json", TARGET_JSON),
                         ("relay", TARGET_BINARY)):
        value = r.get(f"throughput_{name}")
        if name == "relay" and not value:
            continue
        title = (f"output throughput, {name.upper() if name == 'json' else name} protocol, MB/s"
                 if name != "relay" else
                 "output throughput, binary protocol, keeper through a relay exec, MB/s")
        if value:
            ratio = value["median"] / floor_tp["median"] if floor_tp else None
            ratio_text = (f"{ratio:.0%} (best/best {value['best'] / floor_tp['best']:.0%})"
                          if floor_tp else "—")
            rows.append([title, tp_fmt(value), floor_tp_text, ratio_text,
                         f"≥ {target:.0%}",
                         verdict(None if ratio is None else ratio >= target)])
        else:
            rows.append([title, failed("throughput", "capsule (warm)")
                         or "n/a", floor_tp_text, "—", f"≥ {target:.0%}", "—"])

    # CPU per MB of the processes on the bytes' way (the rest of a shared
    # machine's CPU is others' work), in the median run of each.
    paths = {name: r.get(key) for name, key in (
        ("floor", "floor_throughput"), ("binary", "throughput_binary"),
        ("relay", "throughput_relay"))}
    if all(paths[name] and paths[name].get("cpu") for name in ("floor", "binary")):
        per_mb = {name: path_ms_per_mb(value["cpu"], value["bytes"] / 1e6)
                  for name, value in paths.items() if value and value.get("cpu")}
        ratio = per_mb["binary"] / per_mb["floor"]
        rows.append(["CPU on the bytes' path (generator, keeper, capsule, dockerd, shim, kernel"
                     " threads, client), binary protocol, ms per MB",
                     f"{per_mb['binary']:.1f}" + (f" (relay exec: {per_mb['relay']:.1f})"
                                                  if "relay" in per_mb else ""),
                     f"raw exec stream: {per_mb['floor']:.1f}", f"{ratio:.2f}x",
                     "< 1x", verdict(ratio < 1)])

    c = r.get("concurrent")
    n = p["concurrent"]
    if c:
        times = c["times"]
        extra = (f"; per session median {times['median'] / 1000:.2f} s, max"
                 f" {times['max'] / 1000:.2f} s" if times else "")
        fc = r.get("floor_concurrent")
        if fc:
            floor_text = (f"{n} create+start+exec at once ({THREADS} threads):"
                          f" {fc['all_usable_s']:.2f}")
            ratio = f"{c['all_usable_s'] / fc['all_usable_s']:.2f}x"
        else:
            floor_text = failed("concurrent floor") or "n/a"
            ratio = "—"
        rows.append([f"{n} concurrent sessions (pool 2): all usable after, s",
                     f"{c['all_usable_s']:.2f} ({c['ok']}/{c['n']} ok{extra})",
                     floor_text, ratio, "—", verdict(None if not c["failed"] else False)])
        rows.append([f"capsule RSS with {n} sessions, MB",
                     f"before {c['before']:.1f}, during {c['during']:.1f}, after"
                     f" {c['after']:.1f} (peak {c['peak']:.1f})", "—",
                     f"{c['per_session']:.2f} MB/session",
                     f"≤ {TARGET_RSS_PER_SESSION_MB:g} MB/session",
                     verdict(c["per_session"] <= TARGET_RSS_PER_SESSION_MB)])
    else:
        text = failed("concurrent sessions", "capsule (warm)") or "n/a"
        rows.append([f"{n} concurrent sessions (pool 2): all usable after, s", text,
                     "—", "—", "—", "—"])
        rows.append([f"capsule RSS with {n} sessions, MB", text, "—", "—",
                     f"≤ {TARGET_RSS_PER_SESSION_MB:g} MB/session", "—"])

    value = r.get("input_flood")
    if value:
        rows.append([f"input flood to a shell that does not read ({value['seconds']:g} s,"
                     f" {value['offered_mb']:.0f} MB offered): RSS, MB",
                     f"idle {value['idle']:.1f}, peak {value['peak']:.1f}, after"
                     f" {value['after']:.1f}", "—", f"+{value['delta']:.1f} MB",
                     "≤ +20 MB", verdict(value["delta"] <= 20)])
    else:
        text = failed("flood (input)", "capsule (flood)") or "n/a"
        rows.append(["input flood to a shell that does not read", text, "—", "—",
                     "≤ +20 MB", "—"])

    seconds = p["flood_seconds"]
    for name in ("binary", "json"):
        value = r.get(f"flood_{name}")
        how = "slow acks" if name == "binary" else "TCP backpressure only"
        label = name.upper() if name == "json" else name
        if value:
            rows.append([f"flood to a slow reader ({label}, {how}, {seconds:g} s): RSS, MB",
                         f"idle {value['idle']:.1f}, peak {value['peak']:.1f}, after"
                         f" {value['after']:.1f} (client read {value['client_mb']:.1f} MB)",
                         "—", f"+{value['delta']:.1f} MB", f"≤ +{TARGET_FLOOD_MB:g} MB",
                         verdict(value["delta"] <= TARGET_FLOOD_MB)])
            rows.append([f"flood ({label}): client dropped → capsule logs it left, ms",
                         f"{ms(value['left_s']):.0f}", "—", "—", "promptly",
                         verdict(value["left_s"] <= 1.0)])
            after_grace = value["gone_s"] - value["grace"]
            rows.append([f"flood ({label}): client dropped → container gone, s"
                         f" (grace {value['grace']:g} s, sweep 0.2 s)",
                         f"{value['gone_s']:.2f} ({after_grace:.2f} after grace)", "—", "—",
                         f"≤ {TARGET_GONE_AFTER_GRACE_S:g} s after grace",
                         verdict(after_grace <= TARGET_GONE_AFTER_GRACE_S)])
        else:
            text = failed(f"flood ({name})", "capsule (flood)") or "n/a"
            rows.append([f"flood to a slow reader ({label}, {how}, {seconds:g} s)", text,
                         "—", "—", f"≤ +{TARGET_FLOOD_MB:g} MB", "—"])

    for start in ("warm", "cold"):
        value = r.get(f"browser_{start}")
        pool = "pool 2" if start == "warm" else "pool 0"
        for kind, visit in (("first", "first visit"), ("returning", "returning visit")):
            title = f"Chromium: navigation → first prompt drawn, {start} ({pool}), {visit}, ms"
            limit = {("warm", "returning"): TARGET_PAGE_WARM_RETURNING_MS,
                     ("warm", "first"): TARGET_PAGE_WARM_FIRST_MS}.get((start, kind))
            target = f"≤ {limit} ms" if limit is not None else "—"
            if not value:
                rows.append([title, failed(f"browser ({start})", f"capsule (browser-{start})")
                             or "n/a", "—", "—", target, "—"])
                continue
            v = value[kind]

            def mark(key):
                return "—" if v[f"{key}_median"] is None else f"{v[f'{key}_median']:.0f}"

            on_the_way = (f"in the page (medians): DOMContentLoaded {mark('dcl')},"
                          f" xterm.js drew the prompt {mark('xterm_drawn')}"
                          f" ({v.get('by_first_screen', 0)} of {v['n']} drawn first as text),"
                          f" WebSocket created {mark('ws')}, prompt arrived {mark('arrived')};"
                          f" on the wire: handshake sent {mark('wire_handshake')}, answered"
                          f" {mark('wire_opened')}, first frame sent"
                          f" {mark('wire_sent')}, prompt received {mark('wire_frame')};"
                          f" {v['requests']:g} of {v['files']:g} files fetched,"
                          f" {v['kb']:.0f} KiB"
                          + (f"; {v['by_mark']} timed by the page's own mark (no DOM rows)"
                             if v.get("by_mark") else ""))
            ok = None if limit is None else v["median"] <= limit
            rows.append([title, connect_fmt(v), on_the_way, "—", target, verdict(ok)])

    header = ["measure", "capsule", "floor", "ratio", "target", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


def report(run: dict) -> str:
    """
    The table and the notes under it.

    @param run: C{results}, C{failures}, C{p} (the sizes), C{quick}, C{image},
        C{instance}, C{engine_version}, C{load_before}, C{load_after},
        C{other_containers} and C{notes} (what the run itself noted).
    """
    r = run["results"]
    notes = [
        f"Machine: {os.cpu_count()} CPU(s), loopback only; Docker engine"
        f" {run['engine_version']}; image {run['image']}; containers {MEMORY},"
        f" {CPUS:g} CPUs, {PIDS} pids. {'Quick' if run['quick'] else 'Full'} run"
        f" (instance {run['instance']}).",
        "The bench client (Twisted + Autobahn, one process) shares the CPUs with capsule,"
        " dockerd and the container: its CPU time below is taken from the same cores.",
        "Floors use docker-py for create/start/exec_create and capsule's own exec-start"
        " upgrade (ExecStreamProtocol on the reactor) for the stream. Each capsule figure is"
        " measured in turn with its floor; throughput compares the medians of"
        f" {run['p']['repeats']} interleaved runs (the PTY's rate varies from run to run).",
    ]
    if "generator" in r:
        notes.append(f"`head -c N /dev/zero | base64` alone, to /dev/null in the container:"
                     f" {r['generator']:.0f} MB/s of output, so generation is not the"
                     " bottleneck.")
    for name in ("floor_throughput", "throughput_binary", "throughput_json",
                 "throughput_relay"):
        value = r.get(name)
        if value:
            runs = ", ".join(f"{mbps:.1f}" for mbps in value["all"])
            text = (f"{name.replace('_', ' ')}: runs {runs} MB/s; in the median run,"
                    f" {value['chunk'] / 1024:.0f} KiB per read or frame, bench client CPU"
                    f" {value['client_cpu']:.2f} s over {value['seconds']:.2f} s")
            if value.get("server_cpu") is not None:
                text += (f", capsule CPU {value['server_cpu']:.2f} s"
                         f" ({value['server_cpu'] / value['seconds']:.0%} of one core)")
            if value.get("cpu"):
                text += "; " + describe_cpu(value["cpu"], value["bytes"] / 1e6)
            notes.append(text + ".")
    twisted = [(name, r.get(key)) for name, key in (
        ("raw exec", "floor_echo_twisted"), ("capsule binary", "echo_binary_twisted"),
        ("capsule JSON", "echo_json_twisted"))]
    if all(value for _, value in twisted):
        notes.append("Echo as the table measures it (a blocking socket per client: the"
                     " exec-start upgrade for the floor, websocket-client for capsule),"
                     " and through the bench's Twisted clients (Autobahn for capsule),"
                     " whose own event-loop work adds to each round trip: "
                     + ", ".join(f"{name} p50 {value['p50']:.2f} / p99 {value['p99']:.2f} ms"
                                 for name, value in twisted) + ".")
    b2b, floor_b2b = r.get("echo_b2b"), r.get("floor_echo_b2b")
    if b2b and floor_b2b:
        notes.append(f"Echo with keys {KEY_GAP * 1000:g} ms apart vs. back to back"
                     f" (next key as soon as the echo came; 100 keys, binary, Twisted"
                     f" clients): capsule p50"
                     f" {b2b['p50']:.2f} / p99 {b2b['p99']:.2f} ms, raw exec p50"
                     f" {floor_b2b['p50']:.2f} / p99 {floor_b2b['p99']:.2f} ms.")
    for start in ("warm", "cold"):
        traced = (r.get(f"browser_{start}") or {}).get("traced") or {}
        for kind, marks in traced.items():
            page = marks.get("page_marks") or {}
            own = ", ".join(f"{name[8:]} {at:.0f}" for name, at in sorted(
                page.items(), key=lambda item: item[1]))
            notes.append(f"Chromium trace of one more {kind} visit ({start} pool, not counted"
                         f" above; tracing slows it): prompt drawn at {marks['drawn']:.0f} ms"
                         f" from navigation; {describe_trace(marks.get('trace') or {})}"
                         + (f"; the page's marks: {own}" if own else "")
                         + (f" (trace in {marks['trace_file']})" if marks.get("trace_file")
                            else "") + ".")
    before, after, others = run["load_before"], run["load_after"], run["other_containers"]
    if before:
        after = f", after {after[0]:.1f}" if after else ""
        notes.append(f"Load average (1 min) before the run {before[0]:.1f}{after}"
                     f" on {os.cpu_count()} CPUs.")
    if others:
        notes.append(f"{others} other container(s) were running on the"
                     " engine when the bench started; they compete for the same CPUs.")
    notes += run["notes"]
    text = "\n".join(f"- {n}" for n in notes)
    if set(r) - {"density", "pressure", "channels", "gateway", "preview", "preview_table",
                 "egress", "keep", "keep_table", "kube", "kube_table"} or \
            set(run["failures"]) - {"density", "capsule (density)", "gateway", "kube"}:
        text = table(r, run["failures"], run["p"]) + "\n\n" + text
    for name in ("capsule (density)", "density"):
        if name in run["failures"]:
            text += f"\n\nDensity FAILED ({name}): {run['failures'][name][:300]}"
    if r.get("density"):
        d = r["density"]
        extra = " ".join(d.get("extra") or [])
        text += (f"\n\nDensity: {d['n']} idle shell sessions asked for through the API, on"
                 " capsule's default options (per-client and rate limits raised; grace"
                 " outlasting the run" + (f"; and, from --capsule-arg: `{extra}`" if extra
                                          else "") + "):\n\n" + density_table(d))
    if r.get("pressure"):
        p = r["pressure"]
        refusal = p.get("refusal") or {}
        text += (f"\n\nMemory pressure (`pressure.py`): with {p['available_at_start_mib']} MiB"
                 f" available and --memory-reserve {p['reserve_mib']} MiB, capsule admitted"
                 f" {p['sessions_admitted']} sessions holding {p['per_session_mib']} MiB each"
                 f" ({p['real_use_mib']} MiB), then refused: {refusal.get('code')}"
                 f" ({refusal.get('error')}). Afterwards: capsule /health"
                 f" {p['capsule_health']}, dockerd answers {p['dockerd_answers']}, sessions"
                 f" answering {p['sessions_answering']}/{p['sessions_admitted']}, processes"
                 f" killed by the kernel {p['kernel_oom_kills']}, containers OOMKilled"
                 f" {p['containers_oom_killed']}.")
    if r.get("channels"):
        c = r["channels"]
        text += (f"\n\nKeeper channels (`channels.py`, {c['megabytes']} MB, medians of"
                 f" {c['repeats']}): download {c['channel_download_mb_s']} MB/s and echo"
                 f" {c['channel_echo_mb_s']} MB/s through a session's keeper stream, against"
                 f" {c['tcp_download_mb_s']} and {c['tcp_echo_mb_s']} MB/s over TCP to a"
                 f" container's address; the terminal's echo {c['echo_quiet_ms']} ms quiet,"
                 f" {c['echo_during_bulk_ms']} ms during a bulk channel (which kept"
                 f" {c['bulk_during_echo_mb_s']} MB/s).")
    if r.get("gateway"):
        g = r["gateway"]
        first, stream = g.get("first_event_ms") or {}, g.get("stream_mib_per_s") or {}
        if first:
            text += (f"\n\nThe Anthropic gateway (`gateway.py`): the first event of a streamed"
                     f" answer over {first['requests']} requests, through the gateway p50"
                     f" {first['gateway_p50']:.2f} ms, p99 {first['gateway_p99']:.2f} ms; the"
                     f" fake upstream alone p50 {first['direct_p50']:.2f} ms, p99"
                     f" {first['direct_p99']:.2f} ms: added p50 {first['added_p50']:.2f} ms"
                     f" (target <= 2 ms).")
        if stream:
            text += (f" A streamed answer of {stream['mib']} MiB: {stream['gateway']:.0f} MiB/s"
                     f" through the gateway, {stream['direct']:.0f} MiB/s from the fake alone.")
    if r.get("keep_table"):
        text += ("\n\nKept sessions (issue 24, `bench/keep.py`; targets: resume within 2x a"
                 " cold start, a fork of 1 GB under 5 s):\n\n" + "\n".join(r["keep_table"]))
    if "kube" in run["failures"]:
        text += f"\n\nThe Kubernetes engine (`bench/kube.py`) FAILED: {run['failures']['kube'][:300]}"
    if r.get("kube_table"):
        text += ("\n\nThe Kubernetes engine on the tests' stand-in API server, pods"
                 " as containers on the same Docker engine, next to Docker (`bench/kube.py`;"
                 " medians and percentiles, the ratio of each median to Docker's):\n\n"
                 + "\n".join(r["kube_table"]))
    if r.get("preview_table"):
        text += ("\n\nA preview (issue 23) next to a direct connection from the host to the"
                 " container's port (`bench/preview.py`; target: 80 % of the direct"
                 " throughput):\n\n" + "\n".join(r["preview_table"]))
    if r.get("egress"):
        e = r["egress"]
        text += (f"\n\nEgress proxy (`egress.py`): {e['megabytes']} MB from a local server,"
                 f" median of {e['repeats']}: direct {e['direct_seconds']} s"
                 f" ({e['direct_mb_per_s']} MB/s), through the proxy {e['proxied_seconds']} s"
                 f" ({e['proxied_mb_per_s']} MB/s): {e['proxied_over_direct'] * 100:.0f} % of"
                 f" direct (target >= 80 %).")
    if r.get("doors"):
        text += ("\n\nWhat a client can make capsule hold through each door, with the caps"
                 " on (each line is the door's script's own JSON: the attack, capsule's"
                 " memory before, at its peak and after, and the caps that bound it):\n\n"
                 + "\n".join(f"- `{json.dumps(door, sort_keys=True)}`" for door in r["doors"]))
    return text
