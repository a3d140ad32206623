"""Input pictures a job names by id (image-to-image, inpainting): where their bytes are.

A job's params name an input (`Family.input_fields`, e.g. `image`, `mask`) in one of three
forms, each of which must belong to the job's tenant:

- `file-<hex>`: a file uploaded with `POST /v1/files` (an `uploaded_file` row, purpose
  `input`, checked for type and size at upload);
- an artifact id: an image output of one of the tenant's jobs (chain a job onto another);
- `<dataset id>/<path>`: one image of an uploaded image data set.

`resolve_input` answers the file's key in the artifact store or a 422 naming the field; the
API calls it at submit (so a wrong id is refused at once) and the runner again when the job
starts (it reads the bytes and sends them to the model server).
"""

from __future__ import annotations

from pathlib import PurePosixPath

from sqlalchemy.orm import Session

from core.errors import InvalidInputError
from core.tables import Artifact, Dataset, UploadedFile

INPUT_PURPOSE = "input"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
IMAGE_DATASET_KINDS = ("images", "captioned_images")


def resolve_input(session: Session, tenant_id: str, ref: str, field: str) -> str:
    """The artifact-store key of the input `ref` names, or 422 naming `field`."""
    if ref.startswith("file-"):
        row = session.get(UploadedFile, ref)
        if row is None or row.tenant_id != tenant_id or row.purpose != INPUT_PURPOSE:
            raise InvalidInputError.one(field, f"no uploaded input file {ref!r}")
        return row.path
    if "/" in ref:
        dataset_id, _, item = ref.partition("/")
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.tenant_id != tenant_id or dataset.path is None:
            raise InvalidInputError.one(field, f"no data set {dataset_id!r}")
        if dataset.kind not in IMAGE_DATASET_KINDS:
            raise InvalidInputError.one(field, f"data set {dataset.name} holds no images")
        path = PurePosixPath(item)
        unsafe = (
            item.startswith("/") or "\\" in item or any(p in ("..", ".", "") for p in path.parts)
        )
        if not item or unsafe or path.suffix.lower() not in IMAGE_SUFFIXES:
            raise InvalidInputError.one(field, f"{item!r} is not an image path in the data set")
        return f"{dataset.path}/{path}"
    artifact = session.get(Artifact, ref)
    if artifact is None or artifact.tenant_id != tenant_id:
        raise InvalidInputError.one(
            field, f"no input {ref!r} (an uploaded file-..., an artifact id or dataset/path)"
        )
    if not artifact.content_type.startswith("image/"):
        raise InvalidInputError.one(field, f"artifact {ref} is {artifact.content_type}")
    return artifact.path
