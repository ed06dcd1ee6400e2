"""`--push_to_hub`: Hub access is checked before training, the output folder is uploaded after it.

    repo_id = check_access(config.hub_model_id, config.output_dir, config.hub_token)  # setup: fails early
    ...                                                                                # train, save
    push(output_dir, repo_id, config.hub_token)                                        # the end
"""

from __future__ import annotations

from pathlib import Path

# Not uploaded: resumable checkpoints (optimiser state, RNG) and hidden temporary files and folders.
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", ".*", ".*/**", "**/.*"]
_LATER = "or drop `--push_to_hub` and upload the output folder later with `hf upload REPO_ID OUTPUT_DIR`."


class HubError(ValueError):
    """The Hub cannot take the upload; the message says why and what to do."""


def check_access(hub_model_id: str | None, output_dir: str | Path, token: str | None) -> str:
    """The full repository id (`user/name`) to push to; `HubError` when the Hub is offline or
    unreachable, no token is found, or the token cannot write."""
    from huggingface_hub import HfApi, errors

    try:
        who = HfApi(token=token).whoami()
    except errors.LocalTokenNotFoundError as err:
        raise HubError("`--push_to_hub`: not logged in to the Hugging Face Hub. Run `hf auth login`, set `HF_TOKEN` "
                       f"or pass `--hub_token`, {_LATER}") from err
    except errors.OfflineModeIsEnabled as err:
        raise HubError(f"`--push_to_hub`: offline mode is on (`HF_HUB_OFFLINE` is set); unset it, {_LATER}") from err
    except errors.HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        reason = "the token is invalid or expired" if status == 401 else f"the Hub answered {status}: {err}"
        raise HubError(f"`--push_to_hub`: {reason}. Check `--hub_token` / `hf auth login`, {_LATER}") from err
    except (OSError, errors.HTTPError) as err:  # no network, DNS, proxy
        raise HubError(f"`--push_to_hub`: cannot reach the Hugging Face Hub ({err}). Check the network, "
                       f"{_LATER}") from err
    role = who.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise HubError(f"`--push_to_hub`: the token of `{who.get('name')}` is read-only; use a token with write "
                       f"access (https://huggingface.co/settings/tokens), {_LATER}")
    name = hub_model_id or Path(output_dir).resolve().name
    return name if "/" in name else f"{who['name']}/{name}"


def push(output_dir: str | Path, repo_id: str, token: str | None) -> str:
    """Create ``repo_id`` (a model repository, if missing) and upload ``output_dir`` but its
    checkpoints; returns the repository's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="End of training",
                      ignore_patterns=IGNORE_PATTERNS)
    return str(url)
