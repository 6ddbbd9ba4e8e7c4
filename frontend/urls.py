from django.http import HttpResponse
from django.urls import path


def home(request):
    return HttpResponse("<!doctype html><title>Adapter hub</title><h1>Adapter hub</h1><p>API docs at <a href='/api/docs/'>/api/docs/</a>.</p>")


urlpatterns = [path("", home, name="home")]
