# cascade proxy image: `cascade db upgrade`, then `cascade serve` on 0.0.0.0:8080.
# Config: mount it and set CASCADE_CONFIG; database: CASCADE_DATABASE_URL (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # litellm: use the price map bundled with the package, never fetch it at start-up
    LITELLM_LOCAL_MODEL_COST_MAP=True

WORKDIR /opt/cascade
COPY . /opt/cascade/src
RUN pip install /opt/cascade/src && rm -rf /opt/cascade/src

COPY deploy/entrypoint.sh /usr/local/bin/cascade-entrypoint
RUN chmod 0755 /usr/local/bin/cascade-entrypoint \
    && groupadd --system --gid 10001 cascade \
    && useradd --system --uid 10001 --gid cascade --home-dir /var/lib/cascade --create-home cascade

# the working directory holds the SQLite default and the ledger spool file
WORKDIR /var/lib/cascade
USER cascade

EXPOSE 8080

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4); sys.exit(0)"]

ENTRYPOINT ["cascade-entrypoint"]
