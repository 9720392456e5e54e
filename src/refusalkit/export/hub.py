"""Upload an export folder (weights + README.md card) to the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

from refusalkit.errors import RefusalkitError


def push_to_hub(folder: str | Path, repo: str, *, private: bool = False) -> str:
    """Create ``repo`` (a model repository, kept if it exists) and upload ``folder``; return its URL.

    Needs the network and a write token (``huggingface-cli login`` or HF_TOKEN). Offline, or on any hub
    failure, raises a RefusalkitError that says so; the local export is complete either way.
    """
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise RefusalkitError(f"{folder} has no README.md model card; export first, then push")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise RefusalkitError(
            f"cannot push to {repo}: HF_HUB_OFFLINE is set. The export is complete in {folder}; "
            f"push later with `huggingface-cli upload {repo} {folder}` when online"
        )
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise RefusalkitError("pushing needs huggingface_hub: `pip install huggingface_hub`") from None
    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder), repo_id=repo, repo_type="model", commit_message="refusalkit export"
        )
    except Exception as exc:  # the hub client raises many network/HTTP types; all mean the same to users
        raise RefusalkitError(
            f"could not push {folder} to the Hugging Face Hub repo {repo} ({type(exc).__name__}: {exc}). "
            f"Check the network and your token (`huggingface-cli login` or HF_TOKEN); the export in {folder} "
            f"is complete, push it later with `huggingface-cli upload {repo} {folder}`"
        ) from None
    return f"https://huggingface.co/{repo}"
