"""demo.py's page in a real browser: headless Chromium (Debian's chromium and chromium-driver)
driven by selenium uploads an X-ray through the file input, sees the report, the 14 sorted
bars with the threshold line and the attention image, shows a bad upload's error, runs an
example, saves a screenshot; and for a checkpoint trained with clinical context, the reports
with and without the indication side by side. Skipped where Chromium is absent, except in CI
(.ci/run installs it), where its absence fails."""
import importlib.util
import os
import threading

import pytest

import data
import demo
from chexpert import CONDITIONS
from conftest import train_in_process

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.usefixtures('one_thread')]
CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'


def need_a_browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if importlib.util.find_spec('selenium') is None:
        missing.append('selenium (pip install -r requirements-test.txt)')
    if missing:
        why = f"needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get('CI'):
            pytest.fail(f"{why}: .ci/run should have installed them")
        pytest.skip(why)


@pytest.fixture(scope='module')
def url(tiny_run):
    need_a_browser()
    yield from serve(tiny_run)


def serve(run):
    d = demo.Demo(run, 'cpu', generation=dict(num_beams=1, max_length=40, min_length=5), n_examples=3)
    srv = demo.make_server(d, '127.0.0.1', 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{srv.server_address[1]}/'
    srv.shutdown()
    srv.server_close()
    thread.join(10)


@pytest.fixture(scope='module')
def browser(url):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
                '--window-size=1200,1500'):  # no sandbox: CI runs as root
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # both given: nothing fetched
    driver.get(url)
    yield driver
    driver.quit()


def wait(driver, condition, what, seconds=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, seconds).until(lambda d: condition(d), message=f"waited {seconds} s for {what}")


def by_id(driver, name):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, name)


def report_shown(driver):
    return by_id(driver, 'result').is_displayed() and 'Findings:' in by_id(driver, 'reports').text


def test_upload_an_xray_and_see_the_report_bars_and_attention(browser, phantom_dir, tmp_path):
    from selenium.webdriver.common.by import By
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, '#examples img')) == 3, 'the examples')
    assert 'phase 2, iteration 30' in by_id(browser, 'checkpoint').text
    path = os.path.join(phantom_dir, data.read_split(phantom_dir, 'test')[5]['image'])
    by_id(browser, 'file').send_keys(path)
    wait(browser, report_shown, 'the report')
    assert by_id(browser, 'error').is_displayed() is False
    bars = browser.find_elements(By.CSS_SELECTOR, '#bars .bar')
    assert len(bars) == 14
    rows = [b.text.split('\n') for b in bars]  # 'Edema', '0.734'
    assert sorted(r[0] for r in rows) == sorted(CONDITIONS)
    p = [float(r[-1]) for r in rows]
    assert p == sorted(p, reverse=True)
    thresholds = browser.execute_script("return info.thresholds")  # each condition's own, chosen on val
    for bar, row, v in zip(bars, rows, p):
        if abs(v - thresholds[row[0]]) > 1e-3:  # p is shown to 3 decimals
            assert ('present' in bar.get_attribute('class')) == (v > thresholds[row[0]])
    lines = browser.find_elements(By.CSS_SELECTOR, '#bars .threshold')
    assert len(lines) == 14
    assert [float(line.value_of_css_property('left')[:-2]) for line in lines] == \
        pytest.approx([300 * thresholds[row[0]] for row in rows], abs=0.6)  # the track is 300 px wide
    width = browser.execute_script("const i = document.getElementById('attention'); "
                                   "return i.complete ? i.naturalWidth : 0")
    assert width == 5 * 160
    facts = by_id(browser, 'facts').text
    assert 'gate (weight of the global token): 0.' in facts and ' s on the server' in facts
    assert os.path.basename(path) in by_id(browser, 'image-name').text
    shot = tmp_path / 'demo.png'
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 20_000


@pytest.mark.parametrize('content, words', [(b'these are notes, not an X-ray', 'not a PNG or JPEG image'),
                                            (b'', 'the upload is empty (0 bytes)')])
def test_a_bad_upload_shows_the_servers_message_and_an_example_still_runs(browser, tmp_path, content, words):
    from selenium.webdriver.common.by import By
    bad = tmp_path / 'notes.png'
    bad.write_bytes(content)
    file_input = by_id(browser, 'file')
    file_input.clear()
    file_input.send_keys(str(bad))
    wait(browser, lambda d: by_id(d, 'error').is_displayed(), 'the error')
    message = by_id(browser, 'error').text
    assert 'notes.png' in message and words in message and 'HTTP 400' in message
    browser.find_elements(By.CSS_SELECTOR, '#examples img')[1].click()  # the server still answers
    wait(browser, lambda d: not by_id(d, 'error').is_displayed() and 'example 1' in by_id(d, 'image-name').text
         and report_shown(d), "example 1's report")
    assert "phantom's own report" in by_id(browser, 'reports').text


@pytest.fixture(scope='module')
def context_url(phantom_dir, tmp_path_factory):
    """The page of a 4-iteration run trained with the indication as context."""
    need_a_browser()
    out = str(tmp_path_factory.mktemp('runs') / 'context')
    code, printed = train_in_process(phantom_dir, out, context=True, context_dropout=0.5, max_iters=4)
    assert code == 0, printed[-2000:]
    yield from serve(out)


def test_a_context_checkpoint_shows_the_reports_with_and_without_the_indication(browser, context_url):
    from selenium.webdriver.common.by import By
    browser.get(context_url)
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, '#examples img')) == 3, 'the examples')
    assert by_id(browser, 'indication-box').is_displayed()
    assert 'with the indication as context' in by_id(browser, 'checkpoint').text
    browser.find_elements(By.CSS_SELECTOR, '#examples img')[0].click()
    wait(browser, report_shown, 'the reports')
    indication = by_id(browser, 'indication').get_attribute('value')
    assert indication  # the example's own indication, filled in
    titles = [h.text for h in browser.find_elements(By.CSS_SELECTOR, '#reports h3')]
    assert titles[:2] == [f'with the indication "{indication}"', 'without it']
    by_id(browser, 'indication').clear()
    by_id(browser, 'indication').send_keys('Trauma, rib pain.')
    by_id(browser, 'again').click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#reports h3')[0].text
         == 'with the indication "Trauma, rib pain."', 'the reports with the new indication')
    texts = [t.text for t in browser.find_elements(By.CSS_SELECTOR, '#reports .report div')]
    assert all(t.startswith('Findings:') and 'Indication' not in t and 'rib pain' not in t for t in texts[:2])
