"""The measured agreement of each sampler and schedule with diffusers: runs the equivalence tests and tabulates the
max |Δ| each one records (``record_property``) against the scale of the state it compares.

Every row is one parametrised test: our sampler on the scheduler's own σ's, the same starting state and, for the
stochastic ones, the same noise (diffusers' generator draws, or for ``dpmpp_sde`` the same Brownian trees); schedules
are compared as σ tables. A tiny random float64 ``UNet2DModel``; diffusers computes its coefficients in float32, hence
the ~1e-7 relative floor.

    python benchmarks/equivalence_table.py [--out benchmarks/results/sampler_equivalence.md]
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

TESTS = [
    "tests/test_multistep_samplers.py::test_unipc_matches_diffusers",
    "tests/test_multistep_samplers.py::test_unipc_without_corrector_matches_diffusers_disable_corrector",
    "tests/test_multistep_samplers.py::test_deis_matches_diffusers",
    "tests/test_multistep_samplers.py::test_lms_matches_diffusers",
    "tests/test_samplers_stochastic.py::test_matches_diffusers_with_shared_generator",
    "tests/test_samplers_stochastic.py::test_dpmpp_sde_matches_diffusers_dpmsolver_sde",
    "tests/test_schedules_names.py::test_schedule_equals_diffusers_sigma_option",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sampler_equivalence.md")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                              *TESTS], cwd=root, capture_output=True, text=True)
        if not xml.is_file():
            sys.exit(f"the tests did not run:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
        cases = ET.parse(xml).getroot().iter("testcase")
        groups: dict[str, list[tuple[str, float, float, bool]]] = defaultdict(list)
        for case in cases:
            props = {p.get("name"): float(p.get("value")) for p in case.iter("property")}
            if "max_abs_diff" not in props:
                continue
            name = case.get("name")
            test, _, params = name.partition("[")
            passed = case.find("failure") is None and case.find("error") is None
            groups[test].append((params.rstrip("]"), props["max_abs_diff"], props.get("state_scale", 1.0), passed))
    lines = [f"# Agreement with diffusers, measured ({datetime.date.today()}; `python benchmarks/equivalence_table.py`)",
             "", "| test | cases | max \\|Δ\\| (all cases) | worst case: state scale | worst case: \\|Δ\\| / scale | all pass |", "|---|---|---|---|---|---|"]
    for test, rows in groups.items():
        worst = max(rows, key=lambda r: r[1] / max(r[2], 1e-30))
        lines.append(f"| `{test}` | {len(rows)} | {max(r[1] for r in rows):.2e} | {worst[2]:.3g} | "
                     f"{worst[1] / max(worst[2], 1e-30):.2e} ({worst[0]}) | {'yes' if all(r[3] for r in rows) else 'NO'} |")
    lines += ["", "Per case:", "", "| test | case | max \\|Δ\\| | state scale |", "|---|---|---|---|"]
    for test, rows in groups.items():
        lines += [f"| `{test}` | {p} | {d:.2e} | {s:.3g} |" for p, d, s, _ in rows]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n".join(lines[: 4 + len(groups)]))
    print(f"\nwritten to {args.out}")
    if run.returncode:
        sys.exit(run.returncode)


if __name__ == "__main__":
    main()
