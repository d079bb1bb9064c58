# Redis for the container tests only: Debian's redis-server on the local base image, because no
# image registry (redis:7.4-alpine) is reachable where the tests run. docker-compose.yml's redis
# service runs `sh -c "exec redis-server --requirepass ..."` and `redis-cli ping` in it as is.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*
USER redis
WORKDIR /var/lib/redis
EXPOSE 6379
CMD ["redis-server"]
