"""tasks.report on a synthetic benchmark manifest: aggregation, report files, bolding, HTML links, grids, S3."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from tasks.images import decode_image, encode_png
from tasks.report import aggregate, choose_grid_samples, grid_header_height, write_report

METHODS = ["bicubic", "dr2[N=4,tau=22]", "dr2+sparnethd"]
SCALES = [1.5, 1.8, 2.5, 3.0, 3.5, 5.0, 6.0, 7.0, 10.0, 12.0, 18.0, 24.0]  # 12 ids over 5 levels
UNAVAILABLE = {"lpips_vgg": "weights not found: vgg.pth missing from the cache"}
FID = {"fid_tf_inception@gt": {"bicubic": 81.234, "dr2[N=4,tau=22]": 45.678,
                               "dr2+sparnethd": "unavailable: too few samples (12 < 2048)"},
       "fid_tf_inception@ffhq": {"bicubic": 90.5, "dr2[N=4,tau=22]": 60.25, "dr2+sparnethd": 55.125}}
REFERENCES = {"gt": "ground truth of this run", "ffhq": "ffhq: s3://stats/ffhq512.npz (fid_tf_inception, 70000 images)"}
META = {"title": "Synthetic benchmark", "code_version": "abc1234", "counts": {"samples": 12, "methods": 3},
        "weights": {"dr2": "sha256:0123abcd"}, "storage_options": {"secret": "hunter2"}}


def _level(scale: float) -> str:
    for name, edge in (("x<2", 2), ("x2-4", 4), ("x4-8", 8), ("x8-16", 16)):
        if scale < edge:
            return name
    return "x>=16"


def _face(seed: int, size: int) -> np.ndarray:
    """A cartoon face: enough structure that degraded and restored tiles look different."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), rng.integers(40, 200, 3), np.uint8)
    c, s = size // 2, size / 64
    skin = tuple(int(v) for v in rng.integers(150, 240, 3))
    cv2.ellipse(img, (c, c), (int(22 * s), int(28 * s)), 0, 0, 360, skin, -1)
    for dx in (-9, 9):
        cv2.circle(img, (c + int(dx * s), c - int(6 * s)), max(1, int(3 * s)), (30, 30, 30), -1)
    cv2.ellipse(img, (c, c + int(12 * s)), (int(9 * s), int(4 * s)), 0, 0, 180, (150, 40, 40), max(1, int(s)))
    return img


def synthetic_manifest(root: Path, size: int = 32, seed: int = 0, faces: list[np.ndarray] | None = None):
    """12 ids x 3 methods with random metrics, lpips_vgg all NaN, two error rows; PNGs written under root."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, scale in enumerate(SCALES):
        sid = f"s{k:02d}"
        gt = faces[k % len(faces)] if faces else _face(k, size)
        size = gt.shape[0]
        lq_side = max(16, round(size / scale))
        lq = cv2.resize(cv2.GaussianBlur(gt, (0, 0), 0.5 + scale / 4), (lq_side, lq_side), interpolation=cv2.INTER_AREA)
        lq = np.clip(lq + rng.normal(0, 4, lq.shape), 0, 255).astype(np.uint8)
        up = cv2.resize(lq, (size, size), interpolation=cv2.INTER_CUBIC)
        outs = {
            "bicubic": up,
            "dr2[N=4,tau=22]": cv2.addWeighted(up, 0.5, gt, 0.5, 0),
            "dr2+sparnethd": cv2.addWeighted(up, 0.25, gt, 0.75, 0),
        }
        for name, img in (("lq", lq), ("gt", gt)):
            (root / f"{sid}_{name}.png").write_bytes(encode_png(img))
        for j, method in enumerate(METHODS):
            path = root / f"{sid}_{j}.png"
            path.write_bytes(encode_png(outs[method]))
            err = (sid, method) in {("s03", "dr2[N=4,tau=22]"), ("s10", "dr2+sparnethd")}
            quality = j + rng.normal(0, 0.3)
            rows.append({
                "id": sid, "method": method, "status": "error" if err else "ok",
                "error": "CUDA out of memory while sampling" if err else None,
                "deg_kernel": "aniso", "deg_sigma_x": 1.0, "deg_sigma_y": 2.0, "deg_theta": 0.3,
                "deg_scale": scale, "deg_noise": 5.0, "deg_jpeg": 70.0, "deg_level": _level(scale),
                "psnr_rgb": np.nan if err else 30 - 2 * math.log2(scale) + quality,
                "psnr_y": np.nan if err else 31 - 2 * math.log2(scale) + quality + rng.normal(0, 0.2),
                "ssim_y": np.nan if err else float(np.clip(0.9 - 0.08 * math.log2(scale) + 0.03 * quality, 0, 1)),
                "lpips_alex": np.nan if err else 0.1 + 0.05 * math.log2(scale) - 0.03 * quality,
                "lpips_vgg": np.nan,
                "lq": str(root / f"{sid}_lq.png"), "restored": None if err else str(path),
                "gt": str(root / f"{sid}_gt.png"),
            })
    return pd.DataFrame(rows)


def _md_table(md: str, section: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header, {method: cells}) of the first table after the heading line ('## section' or given whole)."""
    lines = md.splitlines()
    start = lines.index(section if section.startswith("#") else f"## {section}")
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split(" | ")])
        elif rows:
            break
    header, body = rows[0], rows[2:]
    return header, {r[0].replace("\\", ""): r for r in body}


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("href", "src") and v and not v.startswith(("data:", "#")):
                self.refs.append(v)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    df = synthetic_manifest(tmp / "images")
    out = tmp / "run"
    written = write_report(df, str(out), fid=FID, unavailable=UNAVAILABLE, meta=META, grid_samples=6,
                           references=REFERENCES)
    return df, out / "report", written


def test_files_exist(report):
    df, root, written = report
    for rel in ("report.md", "report.html", "aggregate.csv", "plots/psnr_y.png", "plots/ssim_y.png",
                "plots/psnr_rgb.png", "plots/lpips_alex.png", "grids/0.png"):
        assert rel in written and (root / rel).is_file() and (root / rel).stat().st_size > 0, rel
        assert written[rel] == str(root / rel)
    assert not (root / "plots/lpips_vgg.png").exists()  # unavailable: no plot
    assert sorted(written) == sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_aggregate_matches_groupby(report):
    df = report[0]
    agg = aggregate(df.sample(frac=1.0, random_state=3))  # row order must not matter
    ok = df[df["status"] == "ok"]
    metrics = ["psnr_rgb", "psnr_y", "ssim_y", "lpips_alex", "lpips_vgg"]
    by_level = ok.groupby(["method", "deg_level"])[metrics].mean()
    by_all = ok.groupby("method")[metrics].mean()
    assert set(agg["level"]) == {"x<2", "x2-4", "x4-8", "x8-16", "x>=16", "all"}
    assert len(agg) == 3 * 6
    for r in agg.itertuples(index=False):
        want = by_all.loc[r.method] if r.level == "all" else by_level.loc[(r.method, r.level)]
        for m in metrics:
            got = getattr(r, m)
            assert (math.isnan(got) and math.isnan(want[m])) or got == pytest.approx(want[m], rel=1e-12), (r, m)
        part = df[df["method"] == r.method]
        part = part if r.level == "all" else part[part["deg_level"] == r.level]
        assert (r.n, r.n_error, r.n_ok) == (len(part), int((part["status"] != "ok").sum()),
                                            int((part["status"] == "ok").sum()))
        assert r.psnr_y_n == part.loc[part["status"] == "ok", "psnr_y"].notna().sum()
        assert r.lpips_vgg_n == 0
    # levels ordered by scale, "all" last; errors counted
    assert list(agg[agg["method"] == "bicubic"]["level"]) == ["x<2", "x2-4", "x4-8", "x8-16", "x>=16", "all"]
    assert agg.set_index(["method", "level"]).loc[("dr2[N=4,tau=22]", "all"), "n_error"] == 1


def test_best_value_bold(report):
    df, root, _ = report
    md = (root / "report.md").read_text()
    header, rows = _md_table(md, "Overall")
    assert set(rows) == set(METHODS)
    means = df[df["status"] == "ok"].groupby("method")[["psnr_y", "ssim_y", "lpips_alex"]].mean()
    for metric, label, fmt, higher in (("psnr_y", "PSNR Y (dB) ↑", "{:.2f}", True),
                                       ("ssim_y", "SSIM Y ↑", "{:.4f}", True),
                                       ("lpips_alex", "LPIPS Alex ↓", "{:.4f}", False)):
        col = header.index(label)
        best = means[metric].idxmax() if higher else means[metric].idxmin()
        for method, cells in rows.items():
            text = fmt.format(means.loc[method, metric])
            assert cells[col] == (f"**{text}**" if method == best else text), (metric, method, cells[col])
    by_level = df[df["status"] == "ok"].groupby(["deg_level", "method"])["psnr_y"].mean()
    for level in ("x<2", "x2-4", "x4-8", "x8-16", "x>=16"):  # one table per level, bolded the same way
        heading = next(line for line in md.splitlines() if line.startswith(f"### {level}: "))
        lheader, lrows = _md_table(md, heading)
        best = by_level[level].idxmax()
        col = lheader.index("PSNR Y (dB) ↑")
        assert [m for m, cells in lrows.items() if cells[col].startswith("**")] == [best], level
    assert header[:3] == ["method", "n", "errors"]
    assert rows["dr2+sparnethd"][2] == "**1**" and rows["bicubic"][2] == "0"  # error counts stand out


def test_unavailable_metric_shows_reason_not_number(report):
    _, root, _ = report
    md = (root / "report.md").read_text()
    section = md.split("## Unavailable metrics", 1)[1].split("\n## ", 1)[0]
    assert "LPIPS VGG ↓: weights not found: vgg.pth missing from the cache" in section
    for line in md.splitlines():
        if line.startswith("|"):
            assert "LPIPS VGG" not in line
    assert "lpips_vgg" not in md and not re.search(r"\bnan\b", md, re.IGNORECASE)
    html_text = (root / "report.html").read_text()
    assert "weights not found: vgg.pth missing from the cache" in html_text


def test_fid_strings_shown_as_text(report):
    _, root, _ = report
    md = (root / "report.md").read_text()
    header, rows = _md_table(md, "FID")
    assert header == ["method", "FID TF-Inception ↓ vs ffhq", "FID TF-Inception ↓ vs gt"]  # network and reference
    assert rows["dr2+sparnethd"][2] == "unavailable: too few samples (12 < 2048)"
    assert rows["dr2[N=4,tau=22]"][2] == "**45.68**" and rows["bicubic"][2] == "81.23"
    assert rows["dr2+sparnethd"][1] == "**55.12**" and rows["bicubic"][1] == "90.50"  # each column its own best
    assert "unavailable: too few samples (12 &lt; 2048)" in (root / "report.html").read_text()
    # which reference each FID used is spelled out under the table
    assert "vs ffhq: ffhq: s3://stats/ffhq512.npz (fid\\_tf\\_inception, 70000 images)" in md
    assert "vs gt: ground truth of this run" in md


def test_protocol_table_names_protocol_direction_reference(report):
    md = (report[1] / "report.md").read_text()
    header, rows = _md_table(md, "Metric protocols")
    assert header == ["metric", "name", "direction", "protocol", "compared with"]
    by_name = {r[1].replace("\\", ""): r for r in rows.values()}
    assert by_name["psnr_y"][2] == "higher is better" and "BT.601 Y" in by_name["psnr_y"][3]
    assert by_name["psnr_y"][4] == "ground truth"
    assert by_name["lpips_alex"][2] == "lower is better" and "AlexNet" in by_name["lpips_alex"][3]
    tf = by_name["fid_tf_inception"]
    assert tf[2] == "lower is better" and "pt\\_inception-2015-12-05" in tf[3] and "ffhq = ffhq: s3://" in tf[4]
    assert "lpips_vgg" not in by_name  # unavailable: listed there, not here


def test_html_parses_and_references_existing_files(report):
    _, root, written = report
    text = (root / "report.html").read_text()
    assert len(text.encode()) < 4_000_000
    parser = _Refs()
    parser.feed(text)
    parser.close()
    assert {"html", "table", "img", "style"} <= set(parser.tags)
    assert parser.refs, "no relative links"
    for ref in parser.refs:
        assert (root / ref).is_file(), ref
    images = {rel for rel in written if rel.startswith(("plots/", "grids/"))}
    assert images <= set(parser.refs)
    assert "hunter2" not in text and "hunter2" not in (root / "report.md").read_text()  # meta is redacted
    assert "abc1234" in text


def test_grid_size_and_sample_choice(report):
    df, root, written = report
    ids = choose_grid_samples(df, 6)
    assert len(ids) == len(set(ids)) == 6
    levels = df.drop_duplicates("id").set_index("id")["deg_level"]
    assert set(levels[ids]) == {"x<2", "x2-4", "x4-8", "x8-16", "x>=16"}  # spread over all levels
    tile, cols = 256, 1 + len(METHODS) + 1
    grids = sorted(rel for rel in written if rel.startswith("grids/"))
    rows = 0
    for rel in grids:
        rgb, _ = decode_image((root / rel).read_bytes())
        h, w = rgb.shape[:2]
        assert w == cols * tile
        assert (h - grid_header_height(tile)) % tile == 0 and h > tile
        rows += (h - grid_header_height(tile)) // tile
    assert rows == 6


def test_deterministic_and_small_tiles(report, tmp_path):
    df, root, _ = report
    shuffled = df.sample(frac=1.0, random_state=7)
    written = write_report(shuffled, str(tmp_path), fid=FID, unavailable=UNAVAILABLE, meta=META, grid_samples=6,
                           references=REFERENCES)
    for rel in written:
        assert (tmp_path / "report" / rel).read_bytes() == (root / rel).read_bytes(), rel
    w2 = write_report(df, str(tmp_path / "small"), fid={}, unavailable={}, meta={}, grid_samples=2, tile=64)
    rgb, _ = decode_image(Path(w2["grids/0.png"]).read_bytes())
    assert rgb.shape[1] == 5 * 64
    md = Path(w2["report.md"]).read_text()
    assert "no values in the manifest" in md  # an all-NaN metric is reported unavailable even unasked


def test_sparse_manifest(tmp_path):
    """No degradation columns, a method that always failed, missing image files: still a report."""
    df = pd.DataFrame({
        "id": ["a", "a", "b", "b"], "method": ["bicubic", "broken", "bicubic", "broken"],
        "status": ["ok", "error", "ok", "error"], "error": [None, "boom", None, "boom"],
        "psnr_y": [20.0, None, 22.0, None],
        "lq": [str(tmp_path / "missing.png")] * 4, "restored": [None] * 4, "gt": [None] * 4,
    })
    written = write_report(df, str(tmp_path), grid_samples=2)
    md = Path(written["report.md"]).read_text()
    _, rows = _md_table(md, "Overall")
    assert rows["bicubic"][3] == "**21.00**" and rows["broken"][3] == "–" and rows["broken"][2] == "**2**"
    assert "No FID was computed." in md and "| boom | broken | 2 | a, b |" in md
    rgb, _ = decode_image(Path(written["grids/0.png"]).read_bytes())
    assert rgb.shape[:2] == (grid_header_height(256) + 2 * 256, 4 * 256)


def test_report_on_s3(s3_server, tmp_path):
    bucket = s3_server.new_bucket("report")
    df = synthetic_manifest(tmp_path / "images")
    fs = s3_server.fs()
    for col in ("lq", "restored", "gt"):  # images on S3 too, read through the same storage_options
        for p in sorted(set(df[col].dropna())):
            fs.pipe_file(f"{bucket}/images/{Path(p).name}", Path(p).read_bytes())
        df[col] = df[col].map(lambda p: None if pd.isna(p) else f"s3://{bucket}/images/{Path(p).name}")
    opts = {"endpoint_url": s3_server.endpoint_url, "key": s3_server.storage_options["key"],
            "secret": s3_server.storage_options["secret"], "client_kwargs": {"region_name": s3_server.region}}
    written = write_report(df, f"s3://{bucket}/run1", fid=FID, unavailable=UNAVAILABLE, meta=META,
                           grid_samples=3, storage_options=opts)
    assert written["report.md"] == f"s3://{bucket}/run1/report/report.md"
    fresh = s3_server.fs()
    keys = set(fresh.find(f"{bucket}/run1/report"))
    assert keys == {u.removeprefix("s3://") for u in written.values()}
    assert "**45.68**" in fresh.cat_file(f"{bucket}/run1/report/report.md").decode()
    rgb, _ = decode_image(fresh.cat_file(f"{bucket}/run1/report/grids/0.png"))
    assert rgb.shape[1] == 5 * 256 and rgb.std() > 10  # real images, not only "unreadable" tiles


def test_untrained_networks_are_named_in_a_banner_at_the_top(tmp_path):
    df = pd.DataFrame({
        "id": ["a", "a", "b"], "method": ["dr2_sparnet", "dyn", "dr2_sparnet"], "status": ["ok"] * 3,
        "psnr_y": [20.0, 21.0, 22.0], "lq": [None] * 3, "restored": [None] * 3, "gt": [None] * 3,
        "weights": ["random-init:tiny+random-init:sparnethd", "sha256:0123:prior.pt+dr2=random-init:tiny",
                    "random-init:tiny+random-init:sparnethd"],
    })
    written = write_report(df, str(tmp_path), grid_samples=0, meta={"metric_weights": {"lpips_alex": "random-init",
                                                                                      "identity": "/w/arc.pth"}})
    md = Path(written["report.md"]).read_text()
    first = md.split("\n\n")[1].replace("\\_", "_")  # right under the title (Markdown-escaped)
    assert first.startswith("> **UNTRAINED NETWORKS")
    for name in ("diffusion network (random-init:tiny)", "enhancer (random-init:sparnethd)", "dr2 (random-init:tiny)",
                 "metric backbone lpips_alex (random-init)"):
        assert name in first
    assert "identity" not in first and "prior.pt" not in first
    html_text = Path(written["report.html"]).read_text()
    assert html_text.index('class="banner"') < html_text.index("<h2")
    assert "enhancer (random-init:sparnethd)" in html_text
    trained = write_report(df.assign(weights="sha256:0123:DR2_FFHQ.pkl+sha256:4567:sparnet.pth"),
                           str(tmp_path / "trained"), grid_samples=0)
    assert "UNTRAINED" not in Path(trained["report.md"]).read_text()
