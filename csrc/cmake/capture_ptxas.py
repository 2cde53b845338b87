"""CMake compiler launcher: runs nvcc, saves its ptxas resource report next to the object.

`ptxas -v` prints one block per kernel and arch (registers, shared memory, spills). The
report of each object goes to `<object>.ptxas` so setup.py can collect it into
`_build_info.json` even on incremental builds; the console keeps everything except those
info lines, which would drown real warnings, but with ptxas' numbered advisories.
"""
import re
import subprocess
import sys

cmd = sys.argv[1:]
proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
out = cmd[cmd.index("-o") + 1] if "-o" in cmd else None
lines = proc.stderr.splitlines(True)
is_info = [l.startswith("ptxas info") or re.match(r"^\s+\d+ bytes stack frame", l) for l in lines]
info = [l for l, i in zip(lines, is_info) if i]
# Numbered advisories ("(C7511) Potential Performance Loss: wgmma.mma_async instructions are
# serialized ...") are "ptxas info" too, but actionable: the console keeps them as well.
rest = [l for l, i in zip(lines, is_info) if not i or re.search(r"\(C\d{4}\)", l)]
# The native targets from `-gencode=arch=...,code=sm_XX`: a unit with no kernels (a launcher)
# prints no per-arch block, yet setup.py must still see which archs it was built for.
targets = sorted({m for a in cmd for m in re.findall(r"code=\[?(?:[\w,]*,)?(sm_\w+)", a)})
if out and proc.returncode == 0:
    with open(out + ".ptxas", "w") as f:
        f.write("# targets: " + " ".join(targets) + "\n")
        f.writelines(info)
sys.stdout.write(proc.stdout)
sys.stderr.writelines(rest)
sys.exit(proc.returncode)
