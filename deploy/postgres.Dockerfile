# Local stand-in for the public `postgres` image: same port, PGDATA and POSTGRES_USER /
# POSTGRES_PASSWORD / POSTGRES_DB variables (first start initialises the data directory).
FROM runner-compose/services:local
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/bin:/usr/bin:/bin \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN mkdir -p "$PGDATA" /var/run/postgresql \
    && chown postgres:postgres "$PGDATA" /var/run/postgresql && chmod 700 "$PGDATA" \
    && chmod 755 /usr/local/bin/docker-entrypoint.sh
USER postgres
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
