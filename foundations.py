"""
foundations.py: the machine under the model. What an inference engineer needs to know about
FLOPs and bytes, the CPU <-> GPU link, NUMA, and Python's threads, processes, asyncio and GIL,
each measured on the machine you run it on.

What you will learn:
  - arithmetic intensity (FLOPs per byte moved) and the ridge point of a roofline: why a matrix
    times ONE vector (decode) runs at the memory's speed and a matrix times many (prefill) at
    the tensor cores', and at how many tokens one turns into the other
  - how bytes travel between host and GPU: pageable vs pinned memory, why a small copy costs
    ~10 us whatever its size, why `non_blocking=True` from pageable memory still blocks
  - NUMA: on a server with two CPU sockets, memory and the GPU hang off one socket each; where
    to find the topology and why an engine pins its host threads near its GPU
  - processes, threads and asyncio: the GIL lets one thread run Python at a time, so a
    pure-Python step (sampling, detokenising, scheduling) does not get faster on threads, while
    work that releases the GIL (PyTorch ops, tiktoken's Rust) does; and how a busy thread slows
    the engine loop that launches the GPU's work
  - asyncio: how one thread serves many streaming requests, and how one blocking call in the
    event loop stalls all of them

Measured on one NVIDIA H200 machine (16 host CPUs, one NUMA node; torch 2.11; 2026-11-28;
results/foundations.md):
  intensity      ridge point 672 TFLOP/s / 4.25 TB/s = 158 FLOP/byte; X @ W^T with W 8192 x 8192
                 fp16: M=1 runs at 1.8 TFLOP/s (memory bound, 43% of copy bandwidth eagerly),
                 M=256 at 360, M=1024 at 584 (87% of the matmul peak): decode vs prefill
  host <-> GPU   pinned 54.6 GB/s each way at 256 MiB, pageable 6-12 GB/s; any copy costs ~13-19 us;
                 a 64 MiB non_blocking copy from pageable memory held the host 8.7 ms (pinned: 25 us)
  the GIL        4 equal jobs on 4 threads: pure Python 0.99x (no gain), a torch matmul 4.1x
  contention     an eager GPT-2 124M decode step (model.decode): 4.2 ms alone, 4.3 s with ONE busy
                 Python thread in the process (the convoy effect below); 0.78 s with 2 busy threads
                 and a 0.5 ms switch interval
  asyncio        100 streams on one thread: p99 gap between tokens 3 ms; with a 10 ms blocking call
                 in the handlers every 10th token: 957 ms

Run:
  python foundations.py               # every measurement, small sizes, ~10-25 s on 2 cores
  python foundations.py --help
  python bench.py --topic foundations # the same as tables (GPU rows where there is a GPU)
"""
import argparse
import asyncio
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

import model as M


# -----------------------------------------------------------------------------
# Part 1. FLOPs versus bytes: arithmetic intensity and the ridge point.
#
# A kernel moves bytes between memory and the chip and does FLOPs on them. Its time is at least
#     max(FLOPs / peak FLOP/s, bytes / bandwidth)
# and which term wins depends on the ratio  intensity = FLOPs / bytes. The machine's own ratio,
# ridge = peak FLOP/s / bandwidth, is where the two meet: H100 ~ 790 TFLOP/s (dense bf16,
# measured elsewhere) / ~3.0 TB/s = ~260 FLOP/byte; the H200 machine of results/foundations.md
# 672 TFLOP/s (cuBLAS fp16, 8192^3) / 4.25 TB/s = 158; a laptop CPU ~ 0.1-1 TFLOP/s /
# 20-50 GB/s = ~5-20. Below the ridge a kernel waits for memory, above it for arithmetic.
#
# The linear layer Y = X W^T with W (N, K) and X (M, K) tokens, 2-byte numbers:
#     FLOPs = 2 M N K,   bytes = 2 (N K + M K + M N)  ~ 2 N K when M << N, K
#     intensity ~ M FLOP/byte  (each weight, once loaded, is used for M tokens)
# Decode has M = batch (1-64): tens of FLOP/byte at most, far under the ridge: memory bound,
# every weight read once per step, and the step's time is weight bytes / bandwidth. Prefill has
# M = prompt tokens (hundreds to thousands): above the ridge, compute bound. Batching decode
# raises M, which is why continuous batching multiplies throughput almost for free until M
# approaches the ridge. intensity_sweep() measures this on the device.

def linear_intensity(M: int, N: int, K: int, bytes_per_element: int = 2) -> float:
    """FLOPs / bytes of Y (M, N) = X (M, K) @ W (N, K)^T, every operand read or written once."""
    return 2 * M * N * K / (bytes_per_element * (N * K + M * K + M * N))


def _rough_time_s(fn, device: torch.device, reps: int) -> float:
    """The demo's rough timer: median wall-clock seconds of a synchronised call (on a GPU that
    includes the launch). bench.py passes its own timer (time_ms: CUDA events, warm-up) instead,
    and that one is behind every published table."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def intensity_sweep(device: torch.device, n: int, tokens=(1, 4, 16, 64, 256, 1024, 4096),
                    dtype: torch.dtype | None = None, reps: int = 10, time_s=None) -> list[dict]:
    """Time X (M, n) @ W (n, n)^T for M in `tokens`: intensity, TFLOP/s and GB/s per M.
    time_s(fn) -> seconds per call (default: the rough timer above, with `reps`)."""
    time_s = time_s or (lambda fn: _rough_time_s(fn, device, reps))
    dtype = dtype or M.default_dtype(device)
    size = torch.finfo(dtype).bits // 8
    w = torch.randn(n, n, device=device, dtype=dtype)
    out = []
    for m in tokens:
        x = torch.randn(m, n, device=device, dtype=dtype)
        s = time_s(lambda: x @ w.t())
        out.append(dict(tokens=m, intensity=linear_intensity(m, n, n, size),
                        tflops=2 * m * n * n / s / 1e12, gbps=size * (n * n + 2 * m * n) / s / 1e9, ms=s * 1e3))
    return out


# -----------------------------------------------------------------------------
# Part 2. CPU <-> GPU: pageable and pinned memory.
#
# The GPU's copy engines move data over PCIe (Gen5 x16: ~64 GB/s each way on paper, ~50 measured)
# by DMA, which needs host memory the OS will not move or swap: page-locked ("pinned").
# Ordinary (pageable) memory is first copied by the CPU into a pinned staging buffer by the
# driver, chunk by chunk, then DMA'd: slower, and synchronous for the host even with
# non_blocking=True (the host must do that staging copy itself). Pinned memory gives the full
# link speed and a truly asynchronous copy that can overlap GPU compute.
# Every copy also costs a fixed ~5-15 us (driver call, DMA setup): a 4-byte copy takes about as
# long as a 64 KB one. Hence serve.py fills ONE pinned staging buffer with all of a decode step's
# inputs and copies it once, instead of several small torch.tensor(...) copies per step.
# (PCIe is ~60x slower than HBM: a model's weights go to the GPU once, never per step.)

def copy_bandwidth(device: torch.device, sizes=(4, 64 << 10, 1 << 20, 16 << 20, 256 << 20),
                   reps: int = 5, time_s=None) -> list[dict]:
    """Host -> device and device -> host copy time and GB/s, pageable vs pinned, per size in
    bytes. Without a GPU: host memcpy (one tensor copy) for the same sizes, for comparison.
    time_s: as in intensity_sweep."""
    time_s = time_s or (lambda fn: _rough_time_s(fn, device, reps))
    out = []
    for nbytes in sizes:
        n = max(1, nbytes // 4)
        if device.type != "cuda":
            src, dst = torch.randn(n), torch.empty(n)
            s = time_s(lambda: dst.copy_(src))
            out.append(dict(bytes=4 * n, kind="host memcpy", direction="host -> host", us=s * 1e6,
                            gbps=4 * n / s / 1e9))
            continue
        gpu = torch.empty(n, device=device)
        for pinned in (False, True):
            host = torch.randn(n).pin_memory() if pinned else torch.randn(n)
            for direction, fn in (("host -> GPU", lambda: gpu.copy_(host, non_blocking=True)),
                                  ("GPU -> host", lambda: host.copy_(gpu, non_blocking=True))):
                s = time_s(fn)
                out.append(dict(bytes=4 * n, kind="pinned" if pinned else "pageable", direction=direction,
                                us=s * 1e6, gbps=4 * n / s / 1e9))
    return out


def nonblocking_blocks_host(device: torch.device, nbytes: int = 64 << 20) -> dict:
    """Host time to *issue* a non_blocking host -> GPU copy: pageable vs pinned. The pageable
    one returns only after the data has been staged (about the whole copy's time); the pinned
    one returns in microseconds and the copy runs while the host goes on."""
    if device.type != "cuda":
        raise RuntimeError("needs a CUDA GPU")
    n = nbytes // 4
    gpu = torch.empty(n, device=device)
    out = {}
    for pinned in (False, True):
        host = torch.randn(n).pin_memory() if pinned else torch.randn(n)
        gpu.copy_(host)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gpu.copy_(host, non_blocking=True)
        issued = time.perf_counter()
        torch.cuda.synchronize()
        done = time.perf_counter()
        out["pinned" if pinned else "pageable"] = dict(issue_us=(issued - t0) * 1e6, total_us=(done - t0) * 1e6)
    return out


# -----------------------------------------------------------------------------
# Part 3. NUMA: which memory is near which CPU, and the GPU's place.
#
# A two-socket server is two computers sharing one address space: each socket has its own DRAM
# channels (a NUMA "node"), and a core reading the other socket's memory crosses the socket link
# (UPI / Infinity Fabric): ~1.5-2x the latency and a fraction of the bandwidth. Each GPU hangs off
# the PCIe lanes of one socket. So an engine's host thread, its pinned staging buffers and its
# GPU should share a node: pin the process to that node's cores (numactl --cpunodebind=N
# --membind=N, or os.sched_setaffinity), and allocate after pinning (Linux places a page on the
# node of the core that first touches it). Get it wrong and host -> GPU copies slow down and the
# launch loop's memory accesses go remote. The topology is in sysfs: /sys/devices/system/node
# (nodes and their CPUs) and /sys/bus/pci/devices/<GPU's PCI address>/numa_node (-1: one node,
# or the firmware does not say). `nvidia-smi topo -m` prints the same per GPU.

@dataclass
class NumaTopology:
    nodes: dict          # node id -> list of CPU ids
    allowed_cpus: list   # what this process may run on (sched_getaffinity)
    gpu_nodes: dict      # GPU index -> NUMA node (-1 unknown / single node)


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def numa_topology(sysfs: str | Path = "/sys") -> NumaTopology:
    """Nodes and their CPUs, this process's CPUs, and each visible GPU's node, from sysfs."""
    sysfs = Path(sysfs)
    nodes = {}
    for node_dir in sorted((sysfs / "devices/system/node").glob("node[0-9]*")):
        cpulist = node_dir / "cpulist"
        if cpulist.exists():
            nodes[int(node_dir.name[4:])] = parse_cpulist(cpulist.read_text())
    gpu_nodes = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            address = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            path = sysfs / "bus/pci/devices" / address / "numa_node"
            gpu_nodes[i] = int(path.read_text()) if path.exists() else -1
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return NumaTopology(nodes, allowed, gpu_nodes)


# -----------------------------------------------------------------------------
# Part 4. Processes, threads, asyncio, and the GIL.
#
# CPython runs Python bytecode in one thread at a time: the Global Interpreter Lock. A thread
# holds it while it executes Python and releases it when it blocks (I/O, sleep) or when C code
# chooses to (PyTorch releases it inside every op; tiktoken inside its Rust encoder; numpy in
# large array operations). Consequences for an inference server:
#  - The engine loop (schedule, fill inputs, launch, read tokens back, check stops) is Python:
#    threads do not parallelise it. Two engine loops in one process share one core's worth of
#    Python. vLLM runs its tokenizer/API server and its engine core in separate PROCESSES.
#  - A thread doing pure-Python work (detokenising, JSON, a slow logits processor) competes with
#    the engine loop for the GIL. The loop releases it inside every PyTorch op (a launch, on a
#    GPU); a busy thread grabs it and keeps it until it blocks or the switch interval (5 ms by
#    default, sys.setswitchinterval) forces a hand-over. A step of hundreds of ops can then wait up
#    to 5 ms per op: the "convoy effect", and the GPU idles meanwhile. gil_contention() measures
#    the loop's slowdown, with the default interval and a shorter one.
#  - Work that releases the GIL does run in parallel on threads: tokenising a batch with
#    tiktoken, CPU matmuls. Processes parallelise everything but pay to start (~50-100 ms with
#    spawn) and to pickle arguments and results across.
#  - asyncio is concurrency without threads: one thread, one event loop, and tasks that give up
#    control at each `await`. It serves thousands of idle or streaming connections cheaply, but
#    any blocking call inside a task (a synchronous engine step, time.sleep, a big json.dumps)
#    freezes every other task until it returns: run such work in an executor or another process.

def python_work(n: int) -> int:
    """Pure-Python CPU work (holds the GIL throughout): a sum of squares modulo a prime."""
    total = 0
    for i in range(n):
        total = (total + i * i) % 1_000_003
    return total


def torch_work(n: int) -> float:
    """Work that releases the GIL: a CPU matmul on one torch thread (so the comparison is about
    Python's threads and processes, not torch's own thread pool)."""
    torch.set_num_threads(1)
    a = torch.ones(n, n) / n
    return float((a @ a @ a).sum())


def noop(n: int) -> int:
    return n


def run_parallel(fn, args: list, mode: str) -> tuple[list, float]:
    """Run fn(arg) for every arg 'serial', on 'threads' or on 'processes'; (results, seconds)."""
    t0 = time.perf_counter()
    if mode == "serial":
        results = [fn(a) for a in args]
    elif mode == "threads":
        with ThreadPoolExecutor(len(args)) as pool:
            results = list(pool.map(fn, args))
    elif mode == "processes":
        # spawn, not fork: forking a process that has started CUDA or torch's thread pools is unsafe
        with ProcessPoolExecutor(len(args), mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(fn, args))
    else:
        raise ValueError(f"mode must be serial, threads or processes, got {mode!r}")
    return results, time.perf_counter() - t0


def gil_scaling(workers: int = 2, py_n: int = 3_000_000, torch_n: int = 1536) -> list[dict]:
    """Wall time of `workers` equal jobs run serially, on threads and on processes, for a
    pure-Python job and a GIL-releasing torch job. processes_s includes starting the pool
    (spawn: a fresh interpreter that imports this module and torch), measured on its own as
    process_start_s with a job that does nothing."""
    out = []
    threads_before = torch.get_num_threads()
    try:
        start = run_parallel(noop, [0] * workers, "processes")[1]
        for name, fn, n in (("pure Python", python_work, py_n), ("torch matmul (releases the GIL)", torch_work, torch_n)):
            times = {mode: run_parallel(fn, [n] * workers, mode)[1] for mode in ("serial", "threads", "processes")}
            # with the start subtracted, the processes' own time; meaningless (NaN) when the start,
            # measured separately, is most of the total (jobs too short next to it)
            work_s = times["processes"] - start
            out.append(dict(work=name, workers=workers, **{f"{m}_s": t for m, t in times.items()},
                            process_start_s=start, threads_speedup=times["serial"] / times["threads"],
                            processes_speedup_after_start=times["serial"] / work_s
                            if work_s > 0.25 * times["serial"] / workers else float("nan")))
    finally:
        torch.set_num_threads(threads_before)
    return out


def gil_contention(step, n_steps: int = 50, busy_threads: int = 1, switch_interval_s: float | None = None,
                   max_s: float = 5.0) -> dict:
    """Median seconds per call of `step` (e.g. one engine step) alone, and while `busy_threads`
    threads run pure Python in the same process (fighting for the GIL). switch_interval_s: the
    interpreter's switch interval during the contended run (sys.setswitchinterval; default 5 ms).
    Each phase stops early after max_s seconds (at least 3 calls)."""
    def timed():
        times, t_start = [], time.perf_counter()
        for i in range(n_steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            if i >= 2 and time.perf_counter() - t_start > max_s:
                break
        return sorted(times)[len(times) // 2]

    alone = timed()
    stop = threading.Event()
    interval_before = sys.getswitchinterval()
    if switch_interval_s is not None:
        sys.setswitchinterval(switch_interval_s)

    def spin():
        while not stop.is_set():
            python_work(10_000)

    spinners = [threading.Thread(target=spin, daemon=True) for _ in range(busy_threads)]
    for t in spinners:
        t.start()
    try:
        contended = timed()
    finally:
        stop.set()
        for t in spinners:
            t.join()
        sys.setswitchinterval(interval_before)
    return dict(alone_ms=alone * 1e3, contended_ms=contended * 1e3, slowdown=contended / alone)


async def _stream(n_tokens: int, token_s: float, blocking_every: int, block_s: float, gaps: list):
    """One streaming request: emits a token every token_s; every blocking_every-th token the
    handler makes a blocking call (time.sleep) instead of awaiting. Records the gap between its
    own consecutive tokens."""
    last = time.perf_counter()
    for i in range(n_tokens):
        await asyncio.sleep(token_s)                     # waits without holding the thread
        if blocking_every and i % blocking_every == blocking_every - 1:
            time.sleep(block_s)                          # the mistake: blocks the event loop
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


def asyncio_streams(n_requests: int = 100, n_tokens: int = 20, token_s: float = 0.002,
                    blocking_every: int = 0, block_s: float = 0.01) -> dict:
    """n_requests concurrent token streams in ONE thread: wall time, and the p50/p99/max gap a
    client sees between tokens. With blocking_every > 0 each request's handler blocks now and
    then, and every other stream stalls with it."""
    gaps: list[float] = []

    async def main():
        await asyncio.gather(*(_stream(n_tokens, token_s, blocking_every, block_s, gaps) for _ in range(n_requests)))

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    gaps.sort()

    def pct(p):
        return gaps[min(len(gaps) - 1, int(p / 100 * len(gaps)))] * 1e3

    return dict(requests=n_requests, tokens=n_tokens * n_requests, wall_s=wall, gap_p50_ms=pct(50),
                gap_p99_ms=pct(99), gap_max_ms=gaps[-1] * 1e3)


# -----------------------------------------------------------------------------
# Demo

def _print_rows(title, rows):
    print(f"\n## {title}\n")
    if not rows:
        return
    print(M.markdown_table(list(rows[0]), [list(r.values()) for r in rows], digits=3))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    M.add_device_arg(parser)
    parser.add_argument("--workers", type=int, default=2, help="threads / processes in the GIL demo (default 2)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    device = M.cli_device(parser, args.device)
    gpu = device.type == "cuda"

    _print_rows(f"Arithmetic intensity of X (M, n) @ W^T on {device}",
                intensity_sweep(device, 4096 if gpu else 512, tokens=(1, 16, 256, 4096) if gpu else (1, 16, 256)))
    _print_rows("Copies between host and device" if gpu else "Host memcpy (no GPU here)",
                copy_bandwidth(device, sizes=(4, 1 << 20, 64 << 20) if gpu else (4, 1 << 20, 16 << 20)))
    if gpu:
        print("\nnon_blocking=True, 64 MiB:", nonblocking_blocks_host(device))
    topo = numa_topology()
    print(f"\n## NUMA\n\nnodes: { {n: f'{len(c)} CPUs' for n, c in topo.nodes.items()} }, this process may use "
          f"{len(topo.allowed_cpus)} CPUs, GPU -> node: {topo.gpu_nodes or 'no GPU'}")
    _print_rows("Threads vs processes vs the GIL", gil_scaling(args.workers))
    _print_rows("asyncio: 100 streams in one thread, without and with a blocking call in the handlers",
                [asyncio_streams(), asyncio_streams(blocking_every=10)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
