"""The OpenAPI declarations of what an operator manages: models (registration, scaling,
checks, deletion), data sets, families, tenants (weights, quotas), the purge, schedules, keys
and sessions, and the dropped broker messages. api/openapi_rules.py turns them into the
document's paths.
"""

from __future__ import annotations

from api.datasets import DATASET_NAME_MAX, KINDS
from api.openapi_rules import (
    DELETED,
    NOT_FOUND,
    Op,
    answer,
    deletion,
    form,
    problem,
    query,
)
from core.artifacts import NAME_PATTERN

ADMIN = problem("This needs an admin key.")
NOT_ADMIN = problem("Not an admin key.")
SHARED = problem("A built-in every tenant shares: only an admin key may delete it.")


def _schedule_action(path: str, operation_id: str, summary: str) -> Op:
    return Op("post", path, operation_id, summary, {200: answer("ScheduleOut", "The schedule.")})


def _list(path: str, operation_id: str, summary: str, schema: str) -> Op:
    return Op("get", path, operation_id, summary, {200: answer(schema, summary)})


FORCE = query(
    "force",
    "Delete a version other versions were fine-tuned from: they are kept, without their"
    " parent link.",
    {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"]},
)

OPERATIONS: tuple[Op, ...] = (
    # -- models, data sets, families (api/catalog.py, api/scaling.py, api/datasets.py) --------
    _list("/v1/models", "listModels", "Visible models", "ModelList"),
    Op(
        "post",
        "/v1/models",
        "registerModel",
        "Register a pretrained diffusers or transformers folder (admin)",
        {
            202: answer("Model", "The new version, `checking`.", "The model's URL."),
            403: NOT_ADMIN,
            409: problem("The name belongs to a model of another family."),
            503: problem("The broker did not take the check; register it again."),
        },
        "The folder is on the server: an absolute path (inside GENQ_PRETRAINED_ROOTS when"
        " set) or a path under the artifact root. Its layout is checked at once (safetensors"
        " weights only); a worker then loads it and marks the new version `ready` or"
        " `failed`. Jobs on a model that is not ready answer 409.",
        body="ModelRegistration",
    ),
    Op(
        "get",
        "/v1/models/{name}",
        "getModelVersions",
        "Every version of a model",
        {200: answer("ModelList", "Versions, oldest first.")},
    ),
    Op(
        "patch",
        "/v1/models/{name}",
        "changeModelScaling",
        "Set the replica policy of every version of a model (admin)",
        {200: answer("ModelList", "The versions changed."), 403: NOT_ADMIN},
        "Only the fields sent change; null goes back to the family's default. Audited; the"
        " scaler applies it at its next look.",
        body="ScalingChange",
    ),
    Op(
        "patch",
        "/v1/models/{name}/{version}",
        "changeModelVersionScaling",
        "Set the replica policy of one version of a model (admin)",
        {200: answer("ModelList", "The version."), 403: NOT_ADMIN},
        body="ScalingChange",
    ),
    deletion(
        "/v1/models/{name}/{version}",
        "deleteModelVersion",
        "Delete a model version",
        "Its row, then its weights when they are in the artifact store and no other version"
        " loads them (a folder registered from elsewhere is left alone). Finished jobs that"
        " used or trained it keep their rows without the link. Audited.",
        "A waiting or running job uses it (`job_ids`), other versions were fine-tuned from it"
        " (`children`; send force=true), or it is built in.",
        answers={403: SHARED},
        parameters=[FORCE],
    ),
    Op(
        "post",
        "/v1/models/{name}/{version}/check",
        "checkModelAgain",
        "Check a registered pretrained folder again (admin)",
        {
            202: answer("Model", "The version, `checking`."),
            403: NOT_ADMIN,
            409: problem("The version is ready, or was trained here."),
            503: problem("The broker did not take the check."),
        },
        "For a version that is `failed` (its folder since fixed) or still `checking` (its"
        " check never came back): the layout is checked again, the version goes back to"
        " `checking` and a worker loads it.",
    ),
    _list("/v1/datasets", "listDatasets", "Visible data sets", "DatasetList"),
    Op(
        "post",
        "/v1/datasets",
        "uploadDataset",
        "Upload a data set: a zip of class folders of images, a zip of captioned images"
        " (captions.jsonl or .txt files), or a text file",
        {
            201: answer("Dataset", "The stored data set."),
            409: problem("The tenant has a data set of this name."),
            413: problem("Over a GENQ_DATASET_MAX_* size, entry or unpacked limit."),
        },
        body=form(
            {
                "name": {"type": "string", "pattern": NAME_PATTERN, "maxLength": DATASET_NAME_MAX},
                "kind": {"type": "string", "enum": list(KINDS)},
                "file": {"type": "string", "format": "binary"},
            }
        ),
    ),
    deletion(
        "/v1/datasets/{dataset_id}",
        "deleteDataset",
        "Delete a data set",
        "Its row, then its files. Finished jobs and versions trained on it keep their rows"
        " without the link. Audited.",
        "A waiting or running job trains on it (`job_ids`), or it is built in.",
        answers={403: SHARED},
    ),
    _list("/v1/families", "listFamilies", "Model families and their parameters", "FamilyList"),
    # -- tenants, purge, schedules (api/tenants.py, api/schedules.py) -------------------------
    Op(
        "get",
        "/v1/tenants",
        "listTenants",
        "Tenants with their weight, quotas and usage (admin: all; else own)",
        {200: answer("TenantList", "Tenants.")},
    ),
    Op(
        "get",
        "/v1/tenants/{ref}",
        "getTenant",
        "A tenant by id or name",
        {200: answer("Tenant", "The tenant.")},
    ),
    Op(
        "patch",
        "/v1/tenants/{ref}",
        "changeTenantQuotas",
        "Set a tenant's weight and quotas (admin); null removes a limit",
        {200: answer("Tenant", "The tenant."), 403: ADMIN},
        body="QuotaChange",
    ),
    Op(
        "post",
        "/v1/admin/purge",
        "purgeJobs",
        "Cancel every waiting job of a tenant and/or a queue (admin)",
        {200: answer("PurgeResult", "How many jobs were canceled."), 403: ADMIN, 404: NOT_FOUND},
        body="PurgeRequest",
    ),
    Op(
        "post",
        "/v1/schedules",
        "createSchedule",
        "Create a schedule (cron, time zone, job template)",
        {
            201: answer("ScheduleOut", "The schedule."),
            409: problem("The tenant has a schedule of that name."),
        },
        body="Schedule",
    ),
    _list("/v1/schedules", "listSchedules", "The caller's schedules (admin: all)", "ScheduleList"),
    Op(
        "get",
        "/v1/schedules/{schedule_id}",
        "getSchedule",
        "A schedule",
        {200: answer("ScheduleOut", "The schedule.")},
    ),
    Op(
        "patch",
        "/v1/schedules/{schedule_id}",
        "changeSchedule",
        "Change a schedule",
        {
            200: answer("ScheduleOut", "The schedule."),
            409: problem("The tenant has a schedule of that name."),
        },
        body="ScheduleChange",
    ),
    Op(
        "delete",
        "/v1/schedules/{schedule_id}",
        "deleteSchedule",
        "Delete a schedule (its jobs stay)",
        {204: DELETED},
    ),
    _schedule_action("/v1/schedules/{schedule_id}/pause", "pauseSchedule", "Pause a schedule"),
    _schedule_action(
        "/v1/schedules/{schedule_id}/resume",
        "resumeSchedule",
        "Resume a schedule from the next slot",
    ),
    # -- keys and sessions (api/keys.py) ------------------------------------------------------
    Op(
        "get",
        "/v1/keys",
        "listKeys",
        "API keys (admin: all, `tenant` filters; else the tenant's own)",
        {200: answer("ApiKeyList", "Keys.")},
        parameters=[query("tenant", "Only this tenant's keys (id or name).")],
    ),
    Op(
        "post",
        "/v1/keys",
        "createKey",
        "Create a key with a scope and an optional expiry (admin)",
        {
            201: answer("ApiKeyCreated", "The key; `key` is shown this once.", "The key's URL."),
            403: ADMIN,
        },
        body="KeyRequest",
    ),
    Op(
        "get",
        "/v1/keys/{key_id}",
        "getKey",
        "A key (admin, or a key of the caller's tenant)",
        {200: answer("ApiKey", "The key.")},
    ),
    Op(
        "delete",
        "/v1/keys/{key_id}",
        "revokeKey",
        "Revoke a key (admin); its dashboard sessions end too",
        {200: answer("ApiKey", "The revoked key."), 403: ADMIN},
    ),
    Op(
        "delete",
        "/v1/admin/sessions",
        "endSessions",
        "Log out everywhere: end every dashboard session (admin)",
        {200: answer("SessionsEnded", "How many sessions ended."), 403: ADMIN},
    ),
    Op(
        "get",
        "/v1/admin/dropped-messages",
        "getDroppedMessages",
        "Malformed broker messages the workers dropped (admin)",
        {200: answer("DroppedMessages", "Counts by reason and the latest ones."), 403: ADMIN},
    ),
)
