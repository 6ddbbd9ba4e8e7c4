# A derived revision's quality verdict (adapters_ops.verdict), a structured field for REST, UI and webhooks.

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('registry', '0003_names_and_token_expiry'),
    ]

    operations = [
        migrations.AddField(
            model_name='revision',
            name='verdict',
            field=models.JSONField(blank=True, default=None, null=True),
        ),
    ]
