"""The web app: recipient pages (`public`), security (`security`), built by `app.create_app`."""
