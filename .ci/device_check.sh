#!/usr/bin/env bash
# The plain install (the device runtime, no torch) in a fresh venv runs an export the compiler venv made:
#   import torch fails; disco-run --help, --version and info work; disco-compile names the install it needs;
#   --simulate, and two --node processes on loopback each holding only its own nodeK/ plus manifest.json and
#   schedule.json, give exactly run_local's outputs.
# Usage: .ci/device_check.sh [COMPILER_PYTHON]   (default .venv/bin/python; needs the package registry for pip)
set -euo pipefail
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
compiler="${1:-.venv/bin/python}"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

echo "device check: export with the compiler ($compiler)"
"$compiler" - "$work" <<'EOF'
import sys
from pathlib import Path
import numpy as np, torch, torch.nn as nn
from disco_compile import Budget, export, transform
work = Path(sys.argv[1])
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                    nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
dm = transform(net, 2, torch.randn(1, 3, 16, 16))
dm.set_budget(Budget(0.5, allocation="uniform", align=1))
export(dm, work / "out", settings={"model": {"description": "device check net"}})
np.save(work / "x.npy", np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32))
EOF

echo "device check: the plain install in a fresh venv"
python3 -m venv "$work/dev"
"$work/dev/bin/pip" install -q .
dev="$work/dev/bin"
if "$dev/python" -c "import torch" 2>/dev/null; then echo "FAIL: torch is importable in the plain install"; exit 1; fi
"$dev/disco-run" --help > /dev/null
"$dev/disco-run" --version | grep -q "disco-run, version"
"$dev/disco-run" info "$work/out" > "$work/info.txt"
grep -q "device check net" "$work/info.txt"
set +e
"$dev/disco-compile" --help > /dev/null 2> "$work/compile.err"; status=$?
set -e
[ "$status" = 2 ] && grep -q "pip install 'disco-compile\[compile\]'" "$work/compile.err" \
  || { echo "FAIL: disco-compile without torch (exit $status):"; cat "$work/compile.err"; exit 1; }

echo "device check: --simulate and two --node processes, each with its own node's files only"
for k in 0 1; do
  mkdir "$work/dev$k"
  cp -r "$work/out/node$k" "$work/out/manifest.json" "$work/out/schedule.json" "$work/dev$k/"
done
"$dev/disco-run" "$work/out" --simulate --input "$work/x.npy" --output "$work/y_sim.npy" > /dev/null
"$dev/disco-run" keygen "$work/keys" --nodes 2 > /dev/null
"$dev/python" - "$work/peers.yaml" <<'EOF'
import sys
from disco_compile.runtime.net.network import free_ports
open(sys.argv[1], "w").write("".join(f"{k}: 127.0.0.1:{p}\n" for k, p in enumerate(free_ports(2))))
EOF
"$dev/disco-run" "$work/dev1" --node 1 --peers "$work/peers.yaml" --keys "$work/keys" > "$work/node1.log" 2>&1 &
pids+=($!)
"$dev/disco-run" "$work/dev0" --node 0 --peers "$work/peers.yaml" --keys "$work/keys" --input "$work/x.npy" \
  --output "$work/y_net.npy" > "$work/node0.log" 2>&1 || { cat "$work/node0.log" "$work/node1.log"; exit 1; }
wait "${pids[0]}" || { echo "FAIL: node 1:"; cat "$work/node1.log"; exit 1; }
pids=()
"$dev/python" - "$work" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from disco_compile import run_local
work = Path(sys.argv[1])
reference = run_local(work / "out", [np.load(work / "x.npy")])[0]
for name in ("y_sim.npy", "y_net.npy"):
    np.testing.assert_array_equal(np.load(work / name), reference, strict=True)
print(f"device check: --simulate and two --node processes match run_local bit for bit ({reference.shape})")
EOF
