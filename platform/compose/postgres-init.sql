-- Run by the postgres image on its first start (an empty data volume), as POSTGRES_USER: the database of
-- MLflow's basic-auth app (users and permissions), kept apart from the tracking store's `mlflow`.
CREATE DATABASE mlflow_auth;
