"""Training data made in code for the fine-tune, copy-check and evaluation tests: phantom chest
radiographs as de-identified CR studies with report-like SR texts, and a tiny base model whose
autoencoder can reproduce them.

Why the base model's VAE is fitted first: fine-tuning (as RoentGen does) trains the UNet and
optionally the text encoder and keeps the VAE frozen. Real VAEs (SD's) reconstruct radiographs
closely; the tiny model's random VAE does not (reconstruction correlation ~0.2), so nothing the
UNet learns could look like its training images. ``fitted_tiny`` trains the tiny VAE as an
autoencoder on phantoms (a few hundred steps, ~0.95 correlation) to give tests the property
every real base model has.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.samples import FINDINGS
from node.samples import phantom_radiograph as phantom

CR = "1.2.840.10008.5.1.4.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

def _base(sop_class: str, study_uid: str, pseudonym: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = pseudonym
    ds.PatientID = pseudonym
    ds.PatientBirthDate = "19000101"
    ds.StudyDate = "19000101"
    ds.AccessionNumber = "ANONYMIZED"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthnode test phantom"
    ds.BodyPartExamined = "CHEST"
    return ds


def write_study(folder: Path, index: int, rng: np.random.Generator, *, size: int = 64,
                finding: int | None = None, report: str | None = None,
                sr: bool = True) -> tuple[Path, str]:
    """One de-identified phantom study in ``folder/study<index>/``: a CR image and (``sr``) a
    Basic Text SR holding ``report`` (default: a findings text with a placeholder and the
    pseudonym planted in it). Returns the CR file and the report text as written."""
    finding = index % len(FINDINGS) if finding is None else finding
    pseudonym = f"SN{index:014d}"[:16].replace("0", "A")
    study_uid = generate_uid()
    study = folder / f"study{index:03d}"
    study.mkdir(parents=True, exist_ok=True)
    ds = _base(CR, study_uid, pseudonym)
    ds.Modality = "CR"
    ds.ViewPosition = "PA"
    pixels = np.rint(phantom(rng, size, finding) * 4095).astype(np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    image = study / "cr.dcm"
    ds.save_as(image, enforce_file_format=True)
    if report is None:
        report = (f"EXAMINATION: CHEST PA. Patient {pseudonym}, seen by Dr. ___ on 19000101. "
                  f"FINDINGS: {FINDINGS[finding]}. IMPRESSION: {FINDINGS[finding]}.")
    if sr:
        doc = _base(BASIC_TEXT_SR, study_uid, pseudonym)
        doc.Modality = "SR"
        doc.ValueType = "CONTAINER"
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.TextValue = report
        doc.ContentSequence = [item]
        doc.save_as(study / "report.dcm", enforce_file_format=True)
    return image, report


def write_studies(folder: Path, count: int, seed: int = 0, size: int = 64) -> list[Path]:
    """``count`` varied phantom studies (all four findings); the CR files."""
    rng = np.random.default_rng(seed)
    return [write_study(folder, i, rng, size=size)[0] for i in range(count)]


def fitted_tiny(folder: Path, steps: int = 300, seed: int = 0) -> Path:
    """The tiny model in ``folder`` with its VAE fitted to phantoms (see the module docstring);
    built once: an existing complete folder is returned as it is."""
    import torch
    from diffusers import AutoencoderKL

    from node.generate.models import HASH_CACHE
    from node.generate.tiny import INPAINT_SUBFOLDER, RESOLUTION, build_tiny

    folder = Path(folder)
    done = folder / ".fitted"
    if done.is_file():
        return folder
    build_tiny(folder)
    rng = np.random.default_rng(seed)
    images = np.stack([phantom(rng, RESOLUTION, i % len(FINDINGS)) for i in range(48)])
    x = torch.tensor(images, dtype=torch.float32)[:, None].repeat(1, 3, 1, 1) * 2 - 1
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
        for _ in range(steps):
            batch = x[torch.randint(0, len(x), (8,))]
            posterior = vae.encode(batch).latent_dist
            loss = ((vae.decode(posterior.sample()).sample - batch) ** 2).mean() + (
                1e-6 * posterior.kl().mean())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():  # latents of unit variance, as SD's 0.18215 gives its VAE
            std = float(vae.encode(x).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(folder / "vae")
    shutil.rmtree(folder / INPAINT_SUBFOLDER / "vae")
    vae.save_pretrained(folder / INPAINT_SUBFOLDER / "vae")
    for cache in folder.rglob(HASH_CACHE):
        cache.unlink()
    done.write_text("fitted\n")
    return folder
