# Local stand-in for the public `redis` image: same port, /data and `redis-server` command.
FROM runner-compose/services:local
RUN mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
