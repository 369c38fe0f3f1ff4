# The gpufleet node agent: gpufleet[agent] only (NVML, psutil, prometheus-client), none of the collector's
# dependencies. NVML itself (libnvidia-ml.so) comes from the node through the NVIDIA container runtime.
# Build from the repository root after building the wheel the tests install:
#   pip wheel --no-deps -w dist . && docker build -f docker/agent.Dockerfile -t gpufleet-agent:0.1.0 .
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim

COPY docker/install-wheel.sh /usr/local/bin/install-wheel.sh
COPY dist/ /tmp/dist/
RUN install-wheel.sh agent /opt/gpufleet /tmp/dist && rm -rf /tmp/dist \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin gpufleet

ENV PATH=/opt/gpufleet/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root by default; the Helm chart runs it as uid 0 (with every capability dropped) only to reach the
# kubelet's root-only pod-resources socket.
USER 10001:10001
EXPOSE 9445
ENTRYPOINT ["gpufleet"]
CMD ["agent"]
