# The gpufleet collector: gpufleet[collector] (FastAPI, SQLAlchemy, Alembic, psycopg, APScheduler, slack-sdk).
# Build from the repository root after building the wheel the tests install:
#   pip wheel --no-deps -w dist . && docker build -f docker/collector.Dockerfile -t gpufleet-collector:0.1.0 .
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim

COPY docker/install-wheel.sh /usr/local/bin/install-wheel.sh
COPY dist/ /tmp/dist/
# The built-in rule pack is also copied to /usr/share/gpufleet/rules, where the chart points --rules and
# mounts rule files that replace or add to it.
RUN install-wheel.sh collector /opt/gpufleet /tmp/dist /usr/share/gpufleet/rules && rm -rf /tmp/dist \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin gpufleet \
    && mkdir -p /var/lib/gpufleet && chown 10001:10001 /var/lib/gpufleet

ENV PATH=/opt/gpufleet/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GPUFLEET_DB=sqlite:////var/lib/gpufleet/gpufleet.db \
    GPUFLEET_RULES=/usr/share/gpufleet/rules
USER 10001:10001
WORKDIR /var/lib/gpufleet
VOLUME /var/lib/gpufleet
EXPOSE 9446
ENTRYPOINT ["gpufleet"]
CMD ["collector"]
