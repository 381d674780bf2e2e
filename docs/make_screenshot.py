"""Screenshot of the service's web page showing a SYNTHETIC field's result: docs/images/service_page.png.

Starts the service for a trained run on a loopback port (uvicorn in a thread), draws a SYNTHETIC smear field
(`blastscan.data.synthetic.draw_field`: nothing here is patient data, and the file is named so), uploads it through
the page in headless Chromium (Playwright driving the system's chromium, no `playwright install`), waits for the
result and saves the page. The PNG is reduced to a 128-colour palette so that it stays small in the repository.

    python docs/make_screenshot.py --run runs/<run> [--out docs/images/service_page.png] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import uvicorn
from PIL import Image
from playwright.sync_api import sync_playwright

from blastscan.data.synthetic import draw_field
from blastscan.deploy.service import create_app
from blastscan.workflows.analyze import open_analyzer

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Palette size of the saved PNG: enough for the page and the stained field, small enough to keep it under 400 KB.
COLOURS = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder or an export folder (blastscan export)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "images" / "service_page.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    if not args.chromium:
        raise SystemExit("no chromium found: apt-get install chromium, or pass --chromium")

    analyzer, card = open_analyzer(args.run, device="cpu")
    server = uvicorn.Server(uvicorn.Config(create_app(analyzer, card), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/"

    field = draw_field(np.random.default_rng(args.seed), 960, 720, kinds=["blast", "blast", "lymphocyte", "neutrophil"])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "SYNTHETIC-field.png"
        Image.fromarray(field.image).save(path)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 800})
            page.goto(url)
            page.set_input_files("#file", str(path))
            page.wait_for_selector("body[data-state=done], body[data-state=error]", state="attached", timeout=120_000)
            if page.get_attribute("body", "data-state") != "done":
                raise SystemExit(f"the page shows an error: {page.inner_text('#error')}")
            picture = Path(folder) / "page.png"
            page.screenshot(path=str(picture), full_page=True)
            browser.close()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shot = Image.open(picture).convert("RGB")
        shot.quantize(COLOURS, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    server.should_exit = True
    thread.join(timeout=10)
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
