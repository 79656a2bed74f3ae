# One small image for every streamledger service. Build: docker build -t streamledger .
FROM rust:1.95-bookworm AS build
WORKDIR /src
# librdkafka is built from source by rdkafka-sys: it needs make, a C compiler and perl (present in
# this image); libz comes bundled.
COPY . .
RUN cargo build --release --locked -p streamledger && strip target/release/streamledger

FROM debian:bookworm-slim
# curl for the health checks; ca-certificates for TLS to Kafka or CouchDB when configured.
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 streamledger
COPY --from=build /src/target/release/streamledger /usr/local/bin/streamledger
USER streamledger
WORKDIR /var/lib/streamledger
ENTRYPOINT ["streamledger"]
