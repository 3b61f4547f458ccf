"""Whole photos: decode -> detect faces -> align to the FFHQ template -> restore the crops batched across
photos -> paste back (feathered) -> restored photo + one manifest row per photo and one per face.

A row stays a photo from read to manifest, so a photo commits (its row in <output>/manifest) only after
its restored photo, its face crops and its face rows (<output>/faces/manifest, written first) exist: a
rerun redoes exactly the uncommitted photos. Face rows are keyed "<photo id>#fNN"; a face row written by
a crashed run and rewritten by the rerun is deduplicated on that key by `read_manifest`, like any retry.

Stages (restore.py assembles them when photos.mode is photos or auto):
  LoadPhotos (CPU task)     read + decode any size; error rows for bad input; per-photo (N, tau)
  DetectAlign (CPU actors)  detector built once per actor; plan_faces decides ok/too_small/over_cap/invalid
  PhotoRestore (GPU actors) every ok crop of the batch's photos in one restoration batch (DR2 or dynamic);
                            with --photos.upscale S and a network upsampler, the photos' backgrounds too
                            (tiled, tasks/upsample.py); with a parser, each restored face's parsing mask
  PasteAndWrite (CPU task)  paste-back at the upscaled geometry, PNGs, the face rows' shard

Faces travel between these stages as typed records, read by name: `plans` holds each photo's PlannedFace
records (every detected face), `faces_info` its RestoredFace records (every restored face's annotations,
keyed by face_index), each column cell a JSON list (encode_faces / decode_faces).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tasks.align import AlignConfig, FacePlan, align_faces, paste_back, plan_faces
from tasks.config import Sampled, opt
from tasks.detect import DetectorConfig, build_detector
from tasks.faults import TRANSIENT, RetryConfig, TransientError, row_failure
from tasks.images import decode_image, resize_to
from tasks.load_stage import LISTING_COLUMNS, LOADED, PARAM_TYPES, load_rows, param_columns
from tasks.manifest import ManifestWriter, write_shard
from tasks.parsing import FaceParser, ParserConfig
from tasks.stage import IN_FLIGHT, PIXELS, Contract, Declared
from tasks.storage import join_under
from tasks.upsample import TiledUpsampler, UpsamplerConfig
from tasks.write_stage import put_png

MODES = ("aligned", "photos", "auto")
FACES_DIR = "faces"  # <output>/faces/manifest (face rows) and <output>/faces/restored (crops)

FACE_COLUMNS = [("photo_id", pa.string()), ("face_index", pa.int64()), ("score", pa.float64()),
                ("box", pa.list_(pa.float64())), ("landmarks", pa.list_(pa.float64())),
                ("eye_distance", pa.float64()), ("face_side", pa.float64()), ("border_fraction", pa.float64()),
                ("affine", pa.list_(pa.float64())), ("face_size", pa.int64()), ("detector", pa.string()),
                ("N", pa.int64()), ("tau", pa.int64()), ("omega", pa.int64()), ("enhancer_weights", pa.string()),
                ("note", pa.string()), ("restored", pa.string())]


@dataclass(frozen=True)
class PhotoConfig:
    mode: str = opt("aligned", "aligned: inputs are FFHQ-aligned face crops (no detection) | photos: whole "
                               "photos (detect, align, restore, paste back) | auto: square inputs are taken as "
                               "aligned crops, the others as whole photos (a square whole photo needs 'photos')")
    batch_size: int = opt(4, "photos per batch in the photo stages; their faces are restored together in "
                             "chunks of runtime.batch_size (photos are large: keep this small)")
    detect_actors: int = opt(0, "detector actors (each loads the detector once; CPU unless detector.device); "
                                "0 = autoscale from 1 to half the cluster's CPUs (MTCNN costs ~140 ms/face on "
                                "one CPU thread: a GPU restoring 45 faces/s needs ~7 of them)")
    write_faces: bool = opt(True, "also write each restored face crop to faces/restored/<stem>_fNN.png")
    exif_orientation: bool = opt(True, "turn photos upright by their EXIF Orientation tag before detection (the "
                                       "restored photo is written upright, without EXIF)")
    upscale: int = opt(1, "the restored photo is this many times the input's size: the background comes from "
                          "photos.upsampler, faces are pasted at the upscaled geometry (1 = input size)")
    detector: DetectorConfig = DetectorConfig(device="cpu")
    align: AlignConfig = AlignConfig()
    upsampler: UpsamplerConfig = UpsamplerConfig()
    parser: ParserConfig = ParserConfig()


@dataclass(frozen=True)
class PlannedFace:
    """One detected face's plan as it travels from DetectAlign to PhotoRestore and PasteAndWrite (the `plans`
    column): the face row's plan columns, read by name. Floats are None where they are undefined."""

    face_index: int  # detection order within the photo: the face's key ("<photo id>#fNN")
    status: str  # ok | too_small | over_cap | invalid
    reason: str = ""  # why it is not ok, or a note for an ok face
    score: float | None = None
    box: list[float] | None = None  # x0, y0, x1, y1 in the photo
    landmarks: list[float] | None = None  # x0, y0, ..., x4, y4 in the photo
    eye_distance: float | None = None
    face_side: float | None = None
    border_fraction: float | None = None
    affine: list[float] | None = None  # photo -> crop, 2x3 row-major
    face_size: int = 0

    @classmethod
    def of(cls, plan: FacePlan) -> PlannedFace:
        return cls(**plan.row())

    def matrix(self) -> np.ndarray:
        return np.array(self.affine, np.float64).reshape(2, 3)

    def columns(self) -> dict:
        """The face row's plan columns (the reason goes to `error` or `note`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "reason"}


@dataclass(frozen=True)
class RestoredFace:
    """One restored face's annotations, from PhotoRestore to PasteAndWrite (the `faces_info` column): the
    restoration stage's per-row columns for the face `face_index`; None where the stage has no such column."""

    face_index: int
    seed: int | None = None
    weights: str | None = None
    omega: int | None = None
    enhancer_weights: str | None = None
    restore_method: str | None = None
    sigma_est: float | None = None
    guide_sigmas: str | None = None
    start_t: int | None = None
    eta: float | None = None
    blur_mapper: str | None = None
    diffused_sigma: float | None = None
    start_convention: str | None = None
    scale_map: str | None = None

    def columns(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "face_index"}


def encode_faces(faces: list[PlannedFace] | list[RestoredFace]) -> str:
    """A photo's faces as one cell of a Ray Data column (a JSON list of the records' fields)."""
    return json.dumps([dataclasses.asdict(f) for f in faces])


def decode_faces(kind: type, text: str) -> list:
    """The records encode_faces wrote; a field that is not one of `kind`'s is an error, not ignored."""
    return [kind(**d) for d in json.loads(text)]


def face_id(photo_id: str, index: int) -> str:
    return f"{photo_id}#f{index:02d}"


def _empty_crops(size: int) -> np.ndarray:
    return np.zeros((0, size, size, 3), np.uint8)


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values  # element-wise: a list of equal-shape arrays must not become one big array
    return out


class LoadPhotos(Declared):
    """Ray Data batch function: (id, source, stem, key_error) -> + photo (any size), kind, status, error."""

    @classmethod
    def contract(cls, specs: dict, **kwargs) -> Contract:
        return Contract(LISTING_COLUMNS, (("photo", PIXELS), ("kind", pa.string()), *LOADED,
                                          *((name, PARAM_TYPES.get(name, pa.float64())) for name in specs)))

    def __init__(self, mode: str, max_pixels: int, min_side: int, specs: dict[str, Sampled], job_seed: int,
                 storage_options: dict | None = None, exif_orientation: bool = True,
                 retry: RetryConfig | None = None):
        if mode not in MODES[1:]:
            raise ValueError(f"photos.mode must be one of {MODES}, got {mode!r}")
        self.mode, self.max_pixels, self.min_side = mode, max_pixels, min_side
        self.specs, self.job_seed, self.storage_options = specs, int(job_seed), storage_options
        self.exif_orientation, self.retry = exif_orientation, retry

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        def decode(raw: bytes) -> tuple[np.ndarray, dict]:
            return decode_image(raw, max_pixels=self.max_pixels, min_side=self.min_side,
                                exif_orientation=self.exif_orientation)

        pixels, out = load_rows(batch, decode, self.storage_options, self.retry)
        kind = ["aligned" if self.mode == "auto" and p is not None and p.shape[0] == p.shape[1] else "photo"
                for p in pixels]
        out["photo"] = _objects([np.zeros((1, 1, 3), np.uint8) if p is None else p for p in pixels])
        out["kind"] = np.array(kind, dtype=object)
        out.update(param_columns(batch, self.specs, self.job_seed))
        return out


class DetectAlign(Declared):
    """Ray Data callable class (CPU actors): detector built once; adds plans (encoded PlannedFace records, every
    detected face) and crops (K,S,S,3): crops[i] is the i-th ok face's aligned crop."""

    READS = ("status", "error", "kind", "photo")
    ADDS = (("crops", IN_FLIGHT), ("plans", IN_FLIGHT), ("detector", pa.string()))

    def __init__(self, detector: DetectorConfig, align: AlignConfig, storage_options: dict | None = None):
        self.detector = build_detector(detector, storage_options)
        self.identity = getattr(self.detector, "identity", detector.name)
        self.align = align

    def _aligned_input(self, photo: np.ndarray) -> tuple[list[PlannedFace], list[np.ndarray]]:
        """An aligned crop (auto mode) is its own single face: resized, never pasted."""
        s = self.align.face_size / photo.shape[0]
        face = PlannedFace(face_index=0, status="ok", reason="aligned input (auto mode): restored as a crop",
                           box=[0.0, 0.0, float(photo.shape[1]), float(photo.shape[0])],
                           face_side=float(photo.shape[0]), border_fraction=0.0, affine=[s, 0.0, 0.0, 0.0, s, 0.0],
                           face_size=self.align.face_size)
        return [face], [resize_to(photo, self.align.face_size)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, size = len(batch["id"]), self.align.face_size
        status, kinds, error = list(batch["status"]), list(batch.get("error_kind", [""] * n)), list(batch["error"])
        plans, crops = ["[]"] * n, [_empty_crops(size) for _ in range(n)]
        todo = [k for k in range(n) if status[k] == "ok" and batch["kind"][k] == "photo"]
        try:
            found = self.detector.detect([batch["photo"][k] for k in todo]) if todo else []
        except Exception:  # one bad photo must not fail its batch: find it by running them one at a time
            found = []
            for k in todo:
                try:
                    found.append(self.detector.detect([batch["photo"][k]])[0])
                except Exception as e:
                    found.append(e)
        for k, faces in zip(todo, found):
            try:
                if isinstance(faces, Exception):
                    raise faces
                photo = batch["photo"][k]
                p = plan_faces([f.landmarks for f in faces], [f.score for f in faces], photo.shape, self.align,
                               [f.box for f in faces])
                plans[k] = encode_faces([PlannedFace.of(x) for x in p])
                ok = align_faces(photo, p, self.align)
                crops[k] = np.stack(ok) if ok else _empty_crops(size)
            except Exception as e:
                status[k], kinds[k] = "error", "detect"
                error[k] = f"face detection/alignment failed: {type(e).__name__}: {e}"
        for k in range(n):
            if status[k] == "ok" and batch["kind"][k] == "aligned":
                faces, ok = self._aligned_input(batch["photo"][k])
                plans[k], crops[k] = encode_faces(faces), np.stack(ok)
        out = dict(batch)
        out.update(crops=_objects(crops), plans=np.array(plans, dtype=object), status=np.array(status, dtype=object),
                   error_kind=np.array(kinds, dtype=object), error=np.array(error, dtype=object),
                   detector=np.array([self.identity] * n, dtype=object))
        return out


class PhotoRestore(Declared):
    """Ray Data callable class (GPU actors): the restoration stage (RestoreStage or DynamicStage) built once;
    every ok crop of the batch's photos goes through it in chunks of `chunk` faces.

    A face's seed comes from (job seed, "<photo id>#fNN"), so its result does not depend on which photos
    share its batch. Adds restored_faces (K,R,R,3) per photo and faces_info (encoded RestoredFace records):
    restored_faces[j] is the face faces_info[j] names by its face_index.
    """

    ANNOTATIONS = tuple(f.name for f in dataclasses.fields(RestoredFace) if f.name != "face_index")

    @classmethod
    def contract(cls, upsampler: UpsamplerConfig | None = None, upscale: int = 1, parser: ParserConfig | None = None,
                 **kwargs) -> Contract:
        adds = [("restored_faces", IN_FLIGHT), ("faces_info", IN_FLIGHT), ("weights", pa.string())]
        if upsampler is not None and upscale > 1:
            adds += [("background", PIXELS), ("upsampler_weights", pa.string())]
        if parser is not None and parser.name != "none":
            adds += [("face_masks", IN_FLIGHT), ("parser", pa.string())]
        return Contract(("id", "status", "kind", "plans", "crops"), tuple(adds))

    def __init__(self, stage_cls, stage_kwargs: dict, chunk: int, upsampler: UpsamplerConfig | None = None,
                 upscale: int = 1, parser: ParserConfig | None = None):
        self.stage, self.chunk = stage_cls(**stage_kwargs), max(1, int(chunk))
        self.weights = getattr(self.stage, "weights", None) or self.stage.dr2.weights  # DynamicStage | RestoreStage
        self.upsampler = self.parser = None
        device = getattr(self.stage, "device", None) or self.stage.dr2.device
        if parser is not None and parser.name != "none":
            self.parser = FaceParser(parser, device, stage_kwargs.get("storage_options"))
        if upsampler is not None and upscale > 1:  # a network upsampler, on the restoration's device
            from tasks.runtime import half_dtype

            self.upsampler = TiledUpsampler(upsampler, upscale, device, half_dtype(stage_kwargs["runtime"], device),
                                            stage_kwargs.get("storage_options"))

    def _backgrounds(self, batch: dict[str, np.ndarray]) -> None:
        """The upscaled backgrounds of the batch's ok whole photos, tiled and batched across photos."""
        n = len(batch["id"])
        todo = [k for k in range(n) if batch["status"][k] == "ok" and batch["kind"][k] == "photo"]
        outs = self.upsampler([batch["photo"][k] for k in todo]) if todo else []
        backgrounds = [np.zeros((1, 1, 3), np.uint8)] * n
        for k, bg in zip(todo, outs):
            backgrounds[k] = bg
        batch["background"] = _objects(backgrounds)
        batch["upsampler_weights"] = np.array([self.upsampler.identity] * n, dtype=object)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        owner, index, ids, crops = [], [], [], []
        for k in range(n):
            if batch["status"][k] != "ok":
                continue
            ok_faces = [f for f in decode_faces(PlannedFace, batch["plans"][k]) if f.status == "ok"]
            if len(ok_faces) != len(batch["crops"][k]):
                raise ValueError(f"{batch['id'][k]}: {len(ok_faces)} ok faces but {len(batch['crops'][k])} crops")
            for face, crop in zip(ok_faces, batch["crops"][k]):
                owner.append(k)
                index.append(face.face_index)
                ids.append(face_id(str(batch["id"][k]), face.face_index))
                crops.append(crop)
        restored: list[list[np.ndarray]] = [[] for _ in range(n)]
        info: list[list[RestoredFace]] = [[] for _ in range(n)]
        for i in range(0, len(ids), self.chunk):
            sl = slice(i, i + self.chunk)
            faces = {"id": np.array(ids[sl], dtype=object), "image": np.stack(crops[sl]),
                     "status": np.array(["ok"] * len(ids[sl]), dtype=object)}
            for name in ("N", "tau"):
                if name in batch:
                    faces[name] = np.array([batch[name][k] for k in owner[sl]])
            out = self.stage(faces)
            for j, (k, face_index) in enumerate(zip(owner[sl], index[sl])):
                restored[k].append(out["restored"][j])
                info[k].append(RestoredFace(face_index, **{a: _plain(out[a][j]) for a in self.ANNOTATIONS if a in out}))
        out_size = restored_size(restored, batch.pop("crops"))  # paste-back needs the restored faces only
        batch["restored_faces"] = _objects([np.stack(r) if r else _empty_crops(out_size) for r in restored])
        batch["faces_info"] = np.array([encode_faces(x) for x in info], dtype=object)
        batch["weights"] = np.array([self.weights] * n, dtype=object)
        if self.upsampler is not None:
            self._backgrounds(batch)
        if self.parser is not None:  # per photo (K, S, S) float16 parsing masks of its restored faces
            batch["face_masks"] = _objects([self.parser(f) if kind == "photo" else None
                                            for f, kind in zip(batch["restored_faces"], batch["kind"])])
            batch["parser"] = np.array([self.parser.identity] * n, dtype=object)
        return batch


def restored_size(restored: list[list[np.ndarray]], crops) -> int:
    for r in restored:
        if r:
            return r[0].shape[0]
    return crops[0].shape[1] if len(crops) else 0


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


class PasteAndWrite(Declared):
    """Ray Data batch function (CPU): paste-back, restored photo and face PNGs, the face rows' shard.

    Pixel columns are dropped; what flows on is one small row per photo for the ManifestWriter.
    """

    READS = ("id", "source", "stem", "status", "error", "kind", "photo", "plans", "faces_info", "restored_faces",
             "detector")
    ADDS = (("restored", pa.string()), ("note", pa.string()), ("faces_detected", pa.int64()),
            ("faces_restored", pa.int64()), ("faces_skipped", pa.int64()), ("upscale", pa.int64()),
            ("upsampler", pa.string()), ("upsampler_weights", pa.string()), ("parser", pa.string()))

    def __init__(self, output: str, align: AlignConfig, write_faces: bool, png_compression: int,
                 constants: dict, storage_options: dict | None = None, face_columns: list | None = None,
                 upsampler: str = "none", upsampler_note: str = "", retry: RetryConfig | None = None):
        """align.upscale is the effective upscale (restore.py resolves it with tasks.upsample.resolve_upscale);
        upsampler / upsampler_note: the label and fallback note every photo row records."""
        self.output, self.storage_options, self.retry = output, storage_options, retry
        self.align = align
        self.upsampler, self.upsampler_note = upsampler, upsampler_note
        self.write_faces, self.png_compression = write_faces, png_compression
        self.faces_output = join_under(output, FACES_DIR)
        self.face_writer = ManifestWriter(self.faces_output, face_columns or FACE_COLUMNS, constants,
                                          storage_options, retry)

    def _put(self, folder: str, stem: str, rgb: np.ndarray) -> str:
        return put_png(join_under(self.output, folder), stem, rgb, self.png_compression, self.storage_options,
                       self.retry)

    def _background(self, batch, k: int) -> np.ndarray | None:
        """The upsampler's output for photo k (None: paste_back resizes the photo itself)."""
        if "background" not in batch:
            return None
        bg = batch["background"][k]
        return bg if bg.flags.writeable else bg.copy()  # zero-copy from Ray's object store: read-only

    def _photo(self, batch, k: int, plans: list[PlannedFace], at: dict[int, int]) -> tuple[np.ndarray, str]:
        """The restored photo and its note; at: face_index -> the face's place in restored_faces / face_masks."""
        photo, faces = batch["photo"][k], batch["restored_faces"][k]
        if batch["kind"][k] == "aligned":
            return faces[at[plans[0].face_index]], (
                "aligned input: the restored crop (photos.mode auto takes every square input as an aligned face "
                "crop; use photos.mode photos to detect faces in square photos)")
        up = self.align.upscale
        unchanged = "passed through unchanged" if up == 1 else f"only upscaled x{up}"
        ok = [p for p in plans if p.status == "ok"]
        places = [at[p.face_index] for p in ok]
        masks = [batch["face_masks"][k][j] for j in places] if "face_masks" in batch else None
        out = paste_back(photo, [faces[j] for j in places], [p.matrix() for p in ok], self.align,
                         canvas=self._background(batch, k), masks=masks)
        if not plans:
            return out, f"no faces detected: photo {unchanged}"
        if not ok:
            return out, f"no face restorable (see faces manifest): photo {unchanged}"
        return out, ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        status, kinds, error = list(batch["status"]), list(batch.get("error_kind", [""] * n)), list(batch["error"])
        uris, notes = [""] * n, [""] * n
        detected, restored, skipped = (np.zeros(n, np.int64) for _ in range(3))
        face_rows: list[dict] = []
        for k in range(n):
            if status[k] != "ok":
                continue
            try:
                plans = decode_faces(PlannedFace, batch["plans"][k])
                infos = decode_faces(RestoredFace, batch["faces_info"][k])
                at = {info.face_index: j for j, info in enumerate(infos)}
                faces = batch["restored_faces"][k]
                stem, pid = str(batch["stem"][k]), str(batch["id"][k])
                out, notes[k] = self._photo(batch, k, plans, at)
                if self.upsampler_note and batch["kind"][k] == "photo":
                    notes[k] = "; ".join(x for x in (notes[k], self.upsampler_note) if x)
                uris[k] = self._put("restored", stem, out)
                detected[k] = len(plans) if batch["kind"][k] == "photo" else 0
                done = 0
                for plan in plans:
                    ok = plan.status == "ok"
                    row = dict(plan.columns(), id=face_id(pid, plan.face_index), photo_id=pid,
                               source=batch["source"][k], error="" if ok else plan.reason,
                               note=plan.reason if ok else "",
                               detector=batch["detector"][k], N=_plain(batch["N"][k]) if "N" in batch else None,
                               tau=_plain(batch["tau"][k]) if "tau" in batch else None, restored="")
                    if ok:
                        j = at[plan.face_index]
                        row.update(infos[j].columns())
                        if self.write_faces:
                            row["restored"] = self._put(f"{FACES_DIR}/restored", f"{stem}_f{plan.face_index:02d}",
                                                        faces[j])
                        done += 1
                    face_rows.append(row)
                restored[k] = done
                skipped[k] = len(plans) - done
            except Exception as e:  # a failed paste or write is this photo's error row (transient: uncommitted)
                status[k], kinds[k], error[k] = row_failure(e, "write")
                error[k] = f"paste-back/write failed: {error[k]}"
        if face_rows:  # before the photos' own shard: committed photos always have their face rows
            cols = {name: [r.get(name) for r in face_rows] for name in
                    {f.name for f in self.face_writer.schema}}
            try:
                write_shard(self.face_writer.table(cols), self.faces_output, self.storage_options, self.retry)
            except TransientError as e:  # without their face rows, none of these photos may be committed
                status = [TRANSIENT] * n
                kinds, error = [e.kind] * n, [str(e)] * n
        drop = ("photo", "crops", "restored_faces", "plans", "faces_info", "background", "face_masks")
        out = {key: v for key, v in batch.items() if key not in drop}
        photo_rows = np.array([kind == "photo" for kind in batch["kind"]])
        out["upscale"] = np.where(photo_rows, self.align.upscale, 1).astype(np.int64)
        out["upsampler"] = np.array([self.upsampler if p else "none" for p in photo_rows], dtype=object)
        label = self.upsampler if self.upsampler in ("none", "bicubic") else ""
        weights = batch.get("upsampler_weights", np.array([label] * n, dtype=object))
        out["upsampler_weights"] = np.array([w if p else "" for w, p in zip(weights, photo_rows)], dtype=object)
        parser = batch.get("parser", np.array(["none"] * n, dtype=object))
        out["parser"] = np.array([w if p else "" for w, p in zip(parser, photo_rows)], dtype=object)
        out.update(restored=np.array(uris, dtype=object), note=np.array(notes, dtype=object),
                   faces_detected=detected, faces_restored=restored, faces_skipped=skipped,
                   status=np.array(status, dtype=object), error_kind=np.array(kinds, dtype=object),
                   error=np.array(error, dtype=object))
        return out
