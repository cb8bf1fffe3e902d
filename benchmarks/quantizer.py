"""Nearest-code search: vqtok against vector-quantize-pytorch and torch.cdist.

For K = 512, 8192 and 65536 codes of D = 64 and N = 65,536 vectors, times the
search of each method (median of several runs) and its peak process memory
(each method runs in a fresh subprocess), and compares vqtok's rate with the
machine's rate for the matrix product the search is built on: the same
(N, D) x (D, K) product, alone, in the same blocks.

    python benchmarks/quantizer.py              # needs the `bench` extra
    python benchmarks/quantizer.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

N, D = 65536, 64
SIZES = (512, 8192, 65536)
METHODS = ("vqtok", "matmul", "vector-quantize-pytorch", "cdist")


def measure(method: str, K: int, device: str, repeats: int, n: int = N) -> dict:
    """Runs in a subprocess: time one method over n vectors, report its peak memory."""
    import torch

    from vqtok import quantize

    torch.manual_seed(0)
    flat = torch.randn(n, D, device=device)
    codebook = torch.randn(K, D, device=device)
    block_rows = max(1, (quantize.CUDA_BLOCK_BYTES if device == "cuda" else quantize.CPU_BLOCK_BYTES) // (4 * K))

    if method == "vqtok":

        def run():
            return quantize.nearest_codes(flat, codebook)

    elif method == "matmul":  # the product alone, block by block: the search's limit
        out = torch.empty(min(block_rows, n), K, device=device)

        def run():
            for start in range(0, n, block_rows):
                chunk = flat[start : start + block_rows]
                torch.mm(chunk, codebook.t(), out=out[: chunk.shape[0]])

    elif method == "cdist":

        def run():
            return torch.cdist(flat, codebook).argmin(dim=1)

    elif method == "vector-quantize-pytorch":
        from vector_quantize_pytorch import VectorQuantize

        vq = VectorQuantize(dim=D, codebook_size=K, decay=0.99, commitment_weight=0.25).to(device).eval()
        vq._codebook.embed.data.copy_(codebook[None])

        def run():
            return vq(flat[None])[1]

    with torch.no_grad():
        if method in ("vqtok", "vector-quantize-pytorch", "cdist"):
            codes = run().reshape(-1)
            reference = quantize.nearest_codes(flat[:4096].double(), codebook.double())
            agree = (codes[:4096] == reference).float().mean().item()
        else:
            run()
            agree = None
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    result = {"seconds": statistics.median(times), "agree": agree}
    if device == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        result["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def square_matmul_rate(device: str) -> float:
    import torch

    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    torch.mm(a, b)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        torch.mm(a, b)
    if device == "cuda":
        torch.cuda.synchronize()
    return 5 * 2 * 2048**3 / (time.perf_counter() - start)


def memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.device, args.repeats)))
        return

    import torch

    threads = torch.get_num_threads()
    print(f"N = {N:,} vectors, D = {D}, device {args.device}, torch {torch.__version__}, {threads} threads")
    print(f"square 2048x2048 matrix product: {square_matmul_rate(args.device) / 1e9:.0f} GFLOP/s")
    header = f"{'K':>6}  {'method':<24} {'time (ms)':>10} {'GFLOP/s':>8} {'vs vqtok':>9} {'peak mem':>9} {'agree':>6}"
    print(header)
    print("-" * len(header))
    for K in args.sizes:
        flops = 2 * N * K * D
        rows = {}
        for method in METHODS:
            # A full (N, K) float32 distance matrix, and the copies around it, may not fit.
            if method in ("cdist", "vector-quantize-pytorch") and 3 * N * K * 4 > 0.6 * memory_bytes():
                rows[method] = None
                continue
            cmd = [sys.executable, __file__, "--device", args.device, "--repeats", str(args.repeats)]
            proc = subprocess.run([*cmd, "--child", method, str(K)], capture_output=True, text=True)
            if proc.returncode != 0:
                rows[method] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
                continue
            rows[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        ours = rows["vqtok"]["seconds"]
        for method in METHODS:
            row = rows[method]
            if row is None:
                print(f"{K:>6}  {method:<24} skipped: its (N, K) distance matrix needs {N * K * 4 / 2**30:.0f} GiB")
                continue
            if "error" in row:
                print(f"{K:>6}  {method:<24} failed: {row['error']}")
                continue
            seconds = row["seconds"]
            agree = "" if row["agree"] is None else f"{row['agree']:.1%}"
            print(
                f"{K:>6}  {method:<24} {seconds * 1e3:>10.1f} {flops / seconds / 1e9:>8.1f} "
                f"{seconds / ours:>8.2f}x {row['peak_bytes'] / 2**30:>7.2f}G {agree:>6}"
            )
        if "seconds" in (rows.get("matmul") or {}):
            print(f"{K:>6}  vqtok reaches {rows['matmul']['seconds'] / ours:.0%} of the matrix-product rate")
        print()


if __name__ == "__main__":
    main()
