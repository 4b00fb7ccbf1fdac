# Chorus and chorusctl in a slim image.
#   docker build -t chorus .
#   docker run -v ./deploy/chorus.toml:/etc/chorus/chorus.toml:ro \
#     -e CHORUS_ADMIN_TOKEN=... -e CHORUS_PASSWORD_POSTGRES=... -p 6432:6432 -p 6433:6433 chorus
# Joins run pg_dump/pg_restore/psql: the image carries PostgreSQL 18's client tools, which
# dump every older server and restore into 18 (Chorus picks the newer server's major).

FROM rust:1-slim-bookworm AS build
# pg_query builds libpg_query with a C compiler and generates its bindings with libclang.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY proxy proxy
COPY admin admin
COPY testkit testkit
RUN cargo build --release --locked --bin chorus --bin chorusctl

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl gnupg \
    && curl -fsSL https://www.postgresql.org/media/keys/ACCC4CF8.asc | gpg --dearmor -o /usr/share/keyrings/pgdg.gpg \
    && echo "deb [signed-by=/usr/share/keyrings/pgdg.gpg] https://apt.postgresql.org/pub/repos/apt bookworm-pgdg main" \
       > /etc/apt/sources.list.d/pgdg.list \
    && apt-get update && apt-get install -y --no-install-recommends postgresql-client-18 \
    && apt-get purge -y gnupg && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --home-dir /var/lib/chorus --create-home chorus \
    && mkdir -p /etc/chorus && chmod 0700 /var/lib/chorus
COPY --from=build /src/target/release/chorus /src/target/release/chorusctl /usr/local/bin/
USER chorus
WORKDIR /var/lib/chorus
VOLUME /var/lib/chorus
EXPOSE 6432 6433
ENV CHORUS_LOG=info
# Healthy when the admin API answers /status with the token (chorusctl reads
# CHORUS_ADMIN_TOKEN from the environment).
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
    CMD ["chorusctl", "--admin", "http://127.0.0.1:6433", "status"]
ENTRYPOINT ["chorus", "--config", "/etc/chorus/chorus.toml"]
CMD ["run"]
