# The node image ghcr.io/kubernetes-mig/node: everything install-node.sh copies onto a node, plus
# mig-server for the agent and the controller. Build from the repository root:
#
#   docker build -f configs/install/node.Dockerfile -t ghcr.io/kubernetes-mig/node:0.1.0 .
#
# (Not built by CI: the CI machine has no container engine and no image registry.)
# Layout, which install-node.sh relies on:
#   /opt/kubernetes-mig/bin/{containerd-shim-mig-v2,mig-restore-hook,mig-server}
#   /opt/kubernetes-mig/criu/   CRIU 4.2 with its own libraries (run through its own ld.so)
#   /usr/local/bin/kubectl      to label the node

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace \
 && mkdir -p /out/bin \
 && cp target/release/containerd-shim-mig-v2 target/release/mig-restore-hook \
       target/release/mig-server /out/bin/

FROM debian:bookworm AS criu
# Same recipe as scripts/setup.sh: CRIU from sid unpacked with its libraries into a private prefix.
RUN printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      >/etc/apt/sources.list.d/sid.sources \
 && apt-get update -qq \
 && mkdir /debs /criu && cd /debs \
 && for p in criu libcompel1 libbsd0 libc6 libc-gconv-modules-extra gcc-16-base libgcc-s1 libffi8 \
      libgmp10 libgnutls30t64 libhogweed6t64 libidn2-0 libjansson4 libmd0 libmnl0 libnet9 \
      libnettle8t64 libnftables1 libnftnl11 libnl-3-200 libp11-kit0 libprotobuf-c1 libtasn1-6 \
      libunistring5 libuuid1 libxtables12; do apt-get download -qq "$p/sid"; done \
 && for d in *.deb; do dpkg-deb -x "$d" /criu; done \
 && dpkg-deb -f criu_*.deb Version >/criu/.version \
 && apt-get install -y -qq --no-install-recommends kubernetes-client/sid

FROM debian:bookworm-slim
COPY --from=build /out/bin/ /opt/kubernetes-mig/bin/
COPY --from=criu /criu/ /opt/kubernetes-mig/criu/
COPY --from=criu /usr/bin/kubectl /usr/local/bin/kubectl
