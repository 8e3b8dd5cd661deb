# syntax=docker/dockerfile:1
# The tether image: one static-ish binary (server, agent and client) on a
# small Debian runtime, running as an unprivileged user.
#
#   docker build -t tether .
#   docker run --rm tether --help
#
# The same image runs every role: `tether server ...`, `tether agent ...`
# (see deploy/kubernetes/).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tether \
 && strip target/release/tether \
 && cp target/release/tether /tether

FROM debian:bookworm-slim
# CA roots for agents and clients that verify a server against the system
# store; nothing else is needed at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates=20230311* \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin tether
COPY --from=build /tether /usr/local/bin/tether
USER 10001:10001
# Public port and the metrics / probes port of `tether server`.
EXPOSE 7700 9090
ENTRYPOINT ["/usr/local/bin/tether"]
CMD ["--help"]
