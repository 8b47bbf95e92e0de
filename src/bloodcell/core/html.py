"""Self-contained HTML reports: every figure and thumbnail is embedded, so a file opens offline
in any browser and can be mailed as it is. Shared by the curation and run reports."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #ddd;padding-bottom:.3rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem} td,th{border:1px solid #ddd;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f4f4f4} .num{text-align:right} .muted{color:#666;font-size:.9rem}
.group{border:1px solid #ddd;border-radius:6px;padding:.5rem;margin:.6rem 0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:8px} .cards .group{margin:0;font-size:.85rem}
.thumbs{display:flex;flex-wrap:wrap;gap:6px} figure{margin:0;text-align:center;font-size:.75rem;width:96px}
figure img{width:96px;height:96px;object-fit:cover;border-radius:3px;display:block}
.bad{color:#a00} .tag{display:inline-block;background:#eef;border-radius:3px;padding:0 .3rem;margin-right:.2rem}
"""


def png_data_uri(fig) -> str:
    """Render a matplotlib figure as an embedded PNG and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumbnail_uri(image: np.ndarray, size: int = 96) -> str:
    thumb = Image.fromarray(image)
    thumb.thumbnail((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def esc(value) -> str:
    return html.escape(str(value))


def table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class='num'>{esc(c)}</td>" if j in numeric else f"<td>{c}</td>" for j, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{CSS}</style></head>"
        f"<body>{body}</body></html>"
    )



def file_uri(path: Path) -> str | None:
    """An image file embedded as a data URI; None if it is missing."""
    if not path.is_file():
        return None
    kind = "png" if path.suffix == ".png" else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def html_to_pdf(html_path: Path, timeout: float = 120) -> Path | None:
    """Print a report to PDF with headless Chromium when it is installed; None otherwise."""
    import shutil
    import subprocess
    import tempfile

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        return None
    pdf = html_path.with_suffix(".pdf")
    with tempfile.TemporaryDirectory() as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={profile}", "--no-pdf-header-footer", f"--print-to-pdf={pdf}",
                   Path(html_path).resolve().as_uri()]
        try:
            subprocess.run(command, capture_output=True, timeout=timeout, check=True)
        except (subprocess.SubprocessError, OSError):
            return None
    return pdf if pdf.is_file() and pdf.stat().st_size > 0 else None

