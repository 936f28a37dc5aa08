# syntax=docker/dockerfile:1
#
# One image for every process of crm-events: the services differ only by command
# (`init-db`, `worker`, `beat`, `flower`, or any other `crm-events` subcommand).
#
#   docker build -t crm-events .
#   docker run --rm crm-events --help
#
# No configuration or secret is baked in: every setting is a CRM_* environment variable given
# at run time (see docs/operations.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a virtualenv with the locked dependencies and the package ---------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python -m venv /opt/crm-events
ENV PATH=/opt/crm-events/bin:$PATH

# Dependencies first, from the hash-pinned lock only, so that this layer is rebuilt only when
# the lock changes and nothing unpinned or unverified gets in.
COPY requirements.lock /src/requirements.lock
RUN pip install --require-hashes -r /src/requirements.lock

# Then the package itself, without resolving anything again (requirements.lock holds the run-time
# dependencies only; the development tools are in requirements-dev.lock).
COPY . /src
RUN pip install --no-deps /src \
    && pip check \
    && crm-events --help >/dev/null

# -- runtime: the virtualenv on a clean base, run as an unprivileged user ------------------------
FROM ${PYTHON_IMAGE}

ARG APP_UID=10001
RUN groupadd --system --gid "${APP_UID}" crm \
    && useradd --system --uid "${APP_UID}" --gid crm --no-create-home \
        --home-dir /var/lib/crm-events --shell /usr/sbin/nologin crm \
    && install -d -o crm -g crm -m 0750 /var/lib/crm-events

COPY --from=build /opt/crm-events /opt/crm-events

# CRM_DATA_DIR holds beat's schedule file and, with CRM_DOCUMENT_STORE=filesystem, the documents:
# mount a volume there for the processes that need it to survive a restart.
ENV PATH=/opt/crm-events/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CRM_DATA_DIR=/var/lib/crm-events

WORKDIR /var/lib/crm-events
USER ${APP_UID}:${APP_UID}

ENTRYPOINT ["crm-events"]
CMD ["--help"]
