# PostgreSQL 15 from Debian for the ketenhub compose stack, where the
# official postgres:15 image cannot be pulled (a machine with only a Debian
# mirror). It takes the official image's settings, so compose.yaml works
# with either: POSTGRES_USER, POSTGRES_DB, POSTGRES_PASSWORD_FILE, PGDATA.
#   podman build --format docker --build-arg BASE=localhost/debian:bookworm \
#       -f docker/postgres.Dockerfile -t localhost/ketenhub-postgres:15 docker
#   KH_POSTGRES_IMAGE=localhost/ketenhub-postgres:15 podman-compose ...
ARG BASE=debian:bookworm-slim
FROM ${BASE}

LABEL org.opencontainers.image.title="ketenhub-postgres" \
      org.opencontainers.image.description="PostgreSQL 15 from Debian with the official image's POSTGRES_* settings"

# uid and gid 999 as in the official image, so a volume made by either can
# be used by the other. No cluster from the package: the entry point makes
# one in PGDATA on first start.
RUN groupadd --system --gid 999 postgres \
    && useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql \
        --shell /bin/sh postgres \
    && mkdir -p /etc/postgresql-common/createcluster.d \
    && echo 'create_main_cluster = false' \
        >/etc/postgresql-common/createcluster.d/ketenhub.conf \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        postgresql-15 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown postgres:postgres /var/lib/postgresql/data /var/run/postgresql \
    && chmod 0700 /var/lib/postgresql/data

COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh

ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
VOLUME /var/lib/postgresql/data
USER postgres
EXPOSE 5432
# SIGINT is PostgreSQL's fast shutdown: sessions end, the server
# checkpoints and stops, instead of waiting for every client to leave.
STOPSIGNAL SIGINT
HEALTHCHECK --interval=2s --timeout=5s --retries=30 \
    CMD ["pg_isready", "-h", "127.0.0.1"]
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
